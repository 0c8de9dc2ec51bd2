// Command etcd is etcd's own server main: go.etcd.io/etcd/server/v3's module has no main
// package, and the one in etcd's repository root replaces its modules with local paths.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
