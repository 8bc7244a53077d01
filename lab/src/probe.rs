//! Tiny network tools the lab runs inside pod namespaces (`twill-lab serve`, `twill-lab probe`),
//! so demos and tests do not depend on which netcat or Python a machine happens to have.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

/// Answers "pong" on TCP and UDP `port` (all addresses) until killed.
pub fn serve(port: u16) -> std::io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(b"pong", from);
        }
    });
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"pong");
        });
    }
    Ok(())
}

/// True if a "pong" comes back from `to` over TCP (connect, send, read) or UDP within `timeout`.
pub fn probe(to: SocketAddr, udp: bool, timeout: Duration) -> bool {
    let mut buf = [0u8; 16];
    if udp {
        let Ok(sock) = UdpSocket::bind(("0.0.0.0", 0)) else {
            return false;
        };
        let _ = sock.set_read_timeout(Some(timeout));
        if sock.send_to(b"ping", to).is_err() {
            return false;
        }
        matches!(sock.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"pong"
    } else {
        let Ok(mut conn) = TcpStream::connect_timeout(&to, timeout) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(timeout));
        if conn.write_all(b"ping").is_err() {
            return false;
        }
        matches!(conn.read(&mut buf), Ok(4)) && &buf[..4] == b"pong"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_fails_fast_against_nothing() {
        // A port on loopback nobody listens on: refused at once, no traffic leaves the host.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!probe(free, false, Duration::from_millis(200)));
    }
}
