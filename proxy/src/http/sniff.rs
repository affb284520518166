//! `envoy.filters.listener.http_inspector`: tell HTTP/1.x and h2c apart by the first bytes, so
//! filter chains can match on `application_protocols`. Pure: the data plane's accept step
//! peeks (never consumes) and runs it beside the TLS inspector, under the listener's
//! `listener_filters_timeout`.

/// Name of the listener filter that asks for this detection.
pub const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most bytes http_inspector looks at: a request line longer than this is not HTTP to it.
pub const MAX_PEEK: usize = 1024;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `h2c` prior knowledge.
    H2c,
    /// An HTTP/1.0 request line.
    Http10,
    /// An HTTP/1.1 request line.
    Http11,
    /// Not HTTP.
    NotHttp,
    /// Not enough bytes yet.
    NeedMore,
}

impl Verdict {
    /// The application protocol name Envoy reports, if any.
    pub fn protocol(self) -> Option<&'static str> {
        match self {
            Verdict::H2c => Some("h2c"),
            Verdict::Http10 => Some("http/1.0"),
            Verdict::Http11 => Some("http/1.1"),
            _ => None,
        }
    }
}

/// Classify the first bytes of a connection (pure).
pub fn classify(buf: &[u8]) -> Verdict {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Verdict::H2c
        } else {
            Verdict::NeedMore
        };
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // A request line is `TOKEN SP target SP HTTP/1.x`; reject early on a bad method byte.
        let method_end = buf.iter().position(|b| *b == b' ').unwrap_or(buf.len());
        let method_ok = buf[..method_end].iter().all(u8::is_ascii_uppercase);
        return if !method_ok || buf.len() >= MAX_PEEK {
            Verdict::NotHttp
        } else {
            Verdict::NeedMore
        };
    };
    let line = &buf[..end];
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Verdict::NotHttp;
    };
    if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) || target.is_empty() {
        return Verdict::NotHttp;
    }
    match version {
        b"HTTP/1.1" => Verdict::Http11,
        b"HTTP/1.0" => Verdict::Http10,
        _ => Verdict::NotHttp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_request_lines_and_preface() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n"), Verdict::Http11);
        assert_eq!(classify(b"POST /x HTTP/1.0\r\n"), Verdict::Http10);
        assert_eq!(classify(H2_PREFACE), Verdict::H2c);
        assert_eq!(classify(&H2_PREFACE[..10]), Verdict::NeedMore);
        assert_eq!(classify(b"GET /partial"), Verdict::NeedMore);
        assert_eq!(classify(b"\x16\x03\x01"), Verdict::NotHttp);
        assert_eq!(classify(b"SSH-2.0-x\r\n"), Verdict::NotHttp);
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Verdict::NotHttp);
    }
}
