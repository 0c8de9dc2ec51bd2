//! Free loopback ports (kmetal-runtime's picker, below the ephemeral range), and an echo
//! server on one.

use std::net::Ipv4Addr;

pub use kmetal_runtime::ports::free_port;

/// An echo server on a free loopback port (each connection echoes until EOF), running on the
/// current tokio runtime until it ends: the backend tunnel and proxy tests send traffic to.
pub async fn echo_server() -> std::io::Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}
