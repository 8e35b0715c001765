//! Telling a claimed warm backend its key: `POST /.hangar/claim` with the claim secret it was
//! started with (`Authorization: Bearer`), `x-hangar-key` and `x-hangar-epoch`, before the
//! connect answers. A backend that has no such endpoint (404 or 405) learns its key from the
//! `x-hangar-key` / `x-hangar-epoch` headers of the requests the proxy forwards.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a backend gets to answer its claim.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// The path of the claim request.
pub const CLAIM_PATH: &str = "/.hangar/claim";

/// How a claim request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// 2xx: the backend took its key.
    Accepted,
    /// 404 or 405: it has no claim endpoint (it reads the headers of proxied requests).
    NotSupported,
    /// Anything else: it refused, failed or did not answer; the message says which.
    Refused(String),
}

/// The request, as bytes (one write).
pub fn claim_request(address: SocketAddr, secret: &str, key: &str, epoch: u64) -> Vec<u8> {
    format!(
        "POST {CLAIM_PATH} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {secret}\r\nx-hangar-key: {key}\r\nx-hangar-epoch: {epoch}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The status code of a response whose head starts `bytes`, if it is complete enough.
pub fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Sends the claim to the backend at `address` and reads the status.
pub async fn send_claim(address: SocketAddr, secret: &str, key: &str, epoch: u64) -> ClaimAnswer {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        stream
            .write_all(&claim_request(address, secret, key, epoch))
            .await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > 4096 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&b'\n') {
                break;
            }
        }
        Ok::<_, std::io::Error>(status_of(&buf))
    };
    match tokio::time::timeout(CLAIM_TIMEOUT, attempt).await {
        Err(_) => ClaimAnswer::Refused(format!(
            "it did not answer its claim within {CLAIM_TIMEOUT:?}"
        )),
        Ok(Err(e)) => ClaimAnswer::Refused(format!("its claim request failed: {e}")),
        Ok(Ok(None)) => ClaimAnswer::Refused("it answered its claim with no HTTP status".into()),
        Ok(Ok(Some(s))) if (200..300).contains(&s) => ClaimAnswer::Accepted,
        Ok(Ok(Some(404 | 405))) => ClaimAnswer::NotSupported,
        Ok(Ok(Some(s))) => ClaimAnswer::Refused(format!("it answered its claim with {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_read_from_the_first_line() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.0 404 Not Found\r\nx: y\r\n"), Some(404));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[tokio::test]
    async fn a_claim_carries_the_secret_key_and_epoch() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut answers = vec![];
            for status in ["200 OK", "404 Not Found", "403 Forbidden"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                answers.push(String::from_utf8_lossy(&buf[..n]).to_string());
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            answers
        });
        assert_eq!(
            send_claim(addr, "s3cret", "default/room", 4).await,
            ClaimAnswer::Accepted
        );
        assert_eq!(
            send_claim(addr, "s3cret", "default/room", 4).await,
            ClaimAnswer::NotSupported
        );
        assert!(matches!(
            send_claim(addr, "s3cret", "default/room", 4).await,
            ClaimAnswer::Refused(m) if m.contains("403")
        ));
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("POST /.hangar/claim HTTP/1.1\r\n"));
        assert!(seen[0].contains("authorization: Bearer s3cret\r\n"));
        assert!(seen[0].contains("x-hangar-key: default/room\r\n"));
        assert!(seen[0].contains("x-hangar-epoch: 4\r\n"));
    }
}
