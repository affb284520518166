//! Bidirectional byte copy with half-close and byte counters.

use std::io;

use tokio::net::TcpStream;

/// Per-direction buffer: large enough for bulk throughput, allocated once per connection.
const BUF: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream to upstream.
    pub tx: u64,
    /// Upstream to downstream.
    pub rx: u64,
}

/// Copy both ways until both sides have closed. An EOF from one side is passed on as a
/// write shutdown to the other (half-close), and the other direction keeps flowing.
pub async fn forward(down: &mut TcpStream, up: &mut TcpStream) -> io::Result<Transferred> {
    let (tx, rx) = tokio::io::copy_bidirectional_with_sizes(down, up, BUF, BUF).await?;
    Ok(Transferred { tx, rx })
}
