//! A TCP load balancer for tests of several `bus` nodes, standing in for nginx or HAProxy
//! with backup servers: each new connection goes to the first backend that accepts it,
//! and when either side closes or fails, the other is closed too (a killed node drops its
//! clients' connections at once, and they reconnect through the balancer to another).
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Balancer {
    /// `http://127.0.0.1:<port>/`
    pub url: String,
    accepting: JoinHandle<()>,
}

impl Balancer {
    /// Listens on 127.0.0.1:0 in front of `backends`, tried in order.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("address"));
        let accepting = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                tokio::spawn(async move {
                    for backend in backends {
                        if let Ok(mut upstream) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { url, accepting }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
