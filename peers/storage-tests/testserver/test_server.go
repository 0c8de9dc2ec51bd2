// Package testserver stands in for the file of the same name in
// k8s.io/apiserver/pkg/storage/etcd3/testserver when scripts/peers.sh builds Kubernetes'
// storage tests: instead of starting an embedded etcd, RunEtcd asks kmetal's backend factory
// (kmetal-testkit's k8s_storage module, at the address in KMETAL_STORAGE_FACTORY) for a
// fresh backend for each test: a real etcd, kmetal's gateway over one of its drivers, or
// kine. The tests and their expectations stay Kubernetes' own. The API is the upstream
// file's: NewTestConfig and RunEtcd.
//
// The protocol is one line each way on a TCP connection that the test holds for its
// lifetime: "progress_ms=N\n" (the watch progress notification interval the test set), then
// "endpoint=URL\n" or "error=TEXT\n". Closing the connection tells the factory to drop the
// backend.
package testserver

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// FactoryEnv names the variable holding the backend factory's host:port.
const FactoryEnv = "KMETAL_STORAGE_FACTORY"

// NewTestConfig returns the configuration the tests adjust before RunEtcd; only
// WatchProgressNotifyInterval is read from it (etcd's default is 10 minutes).
func NewTestConfig(t testing.TB) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	return cfg
}

// RunEtcd gets a fresh backend for this test and returns a client connected to it, with the
// recorders the upstream helper installs. The backend is dropped when the test ends.
func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client {
	t.Helper()
	if cfg == nil {
		cfg = NewTestConfig(t)
	}
	factory := os.Getenv(FactoryEnv)
	if factory == "" {
		t.Fatalf("%s is not set: these tests run through kmetal-testkit's k8s_storage suite", FactoryEnv)
	}
	conn, err := net.DialTimeout("tcp", factory, 10*time.Second)
	if err != nil {
		t.Fatalf("backend factory at %s: %v", factory, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := fmt.Fprintf(conn, "progress_ms=%d\n", cfg.WatchProgressNotifyInterval.Milliseconds()); err != nil {
		t.Fatalf("backend factory at %s: %v", factory, err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(120 * time.Second))
	answer, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("backend factory at %s gave no backend: %v", factory, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	answer = strings.TrimSpace(answer)
	endpoint, ok := strings.CutPrefix(answer, "endpoint=")
	if !ok {
		t.Fatalf("backend factory: %s", answer)
	}
	if err := waitServing(endpoint); err != nil {
		t.Fatalf("backend at %s: %v", endpoint, err)
	}
	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 10 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithBlock()},
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatal(err)
	}
	// Registered after the connection's, so it runs first: the client goes before the backend.
	t.Cleanup(func() { _ = client.Close() })
	client.KV = storagetesting.NewKVRecorder(client.KV)
	client.Kubernetes = storagetesting.NewKubernetesRecorder(client.Kubernetes)
	return client
}

// waitServing polls until the endpoint answers a range, for at most 30 s.
func waitServing(endpoint string) error {
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		c, err := clientv3.New(clientv3.Config{
			Endpoints: []string{endpoint}, DialTimeout: time.Second, Logger: zap.NewNop(),
		})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = c.Get(ctx, "/kmetal-ready")
			cancel()
			_ = c.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("no answer within 30 s: %v", last)
}
