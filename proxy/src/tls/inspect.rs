//! `envoy.filters.listener.tls_inspector`: is a connection TLS, and if so, which server name
//! (SNI) and application protocols (ALPN) does its ClientHello ask for? Pure over the bytes
//! peeked so far, so filter chains can match on `transport_protocol: tls`, `server_names` and
//! `application_protocols` before anything is consumed or terminated.
//!
//! The checks follow what Envoy's inspector (BoringSSL's ClientHello parser) accepts: TLS
//! records of type handshake with major version 3, at most 16 KiB each, carrying one
//! ClientHello that may be split over several records; a malformed hello is not TLS (Envoy's
//! `tls_not_found`), and a hello that does not fit in 64 KiB of bytes is refused (Envoy's
//! `client_hello_too_large`, which closes the connection). A malformed SNI or ALPN extension
//! in an otherwise valid hello leaves that fact unknown, as in Envoy, where the real TLS stack
//! reports it later.

/// Name of the listener filter that asks for TLS inspection.
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

/// Most bytes the inspector looks at (Envoy's default `max_client_hello_size`).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Largest plaintext TLS record (RFC 8446 5.1).
const MAX_RECORD: usize = 16 * 1024;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// Longest host name BoringSSL accepts in SNI.
const MAX_HOST_NAME: usize = 255;

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspect {
    /// A valid prefix of a ClientHello: wait for more bytes.
    NeedMore,
    /// Not a TLS ClientHello (the transport stays `raw_buffer`).
    NotTls,
    /// A ClientHello that cannot fit in [`MAX_CLIENT_HELLO`] bytes: Envoy closes the
    /// connection.
    TooLarge,
    /// A complete ClientHello.
    ClientHello(ClientHello),
}

/// The facts of a complete ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the `server_name` extension, if well formed.
    pub sni: Option<String>,
    /// The ALPN protocol names, in the client's order (empty without the extension).
    pub alpn: Vec<String>,
}

/// Inspect the first bytes of a connection. Never panics; looks at no more than
/// [`MAX_CLIENT_HELLO`] bytes.
pub fn inspect(buf: &[u8]) -> Inspect {
    let buf = &buf[..buf.len().min(MAX_CLIENT_HELLO)];
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        // The handshake bytes gathered so far may already hold the whole message.
        if let Some(decided) = decide(&handshake) {
            return decided;
        }
        match record(rest) {
            Record::Partial => break,
            Record::Bad => return Inspect::NotTls,
            Record::Whole { payload, next } => {
                handshake.extend_from_slice(payload);
                rest = next;
            }
        }
    }
    if buf.len() >= MAX_CLIENT_HELLO {
        Inspect::TooLarge
    } else {
        Inspect::NeedMore
    }
}

/// One TLS record at the start of `b`.
enum Record<'a> {
    /// Not enough bytes for the record (or its header) yet, and what is there is valid.
    Partial,
    /// Not a handshake record of TLS.
    Bad,
    /// A whole record: its payload, and the bytes after it.
    Whole { payload: &'a [u8], next: &'a [u8] },
}

fn record(b: &[u8]) -> Record<'_> {
    if let Some(&t) = b.first()
        && t != CONTENT_HANDSHAKE
    {
        return Record::Bad;
    }
    if let Some(&major) = b.get(1)
        && major != 3
    {
        return Record::Bad;
    }
    if b.len() < RECORD_HEADER {
        return Record::Partial;
    }
    let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if len > MAX_RECORD {
        return Record::Bad;
    }
    match b.get(RECORD_HEADER..RECORD_HEADER + len) {
        Some(payload) => Record::Whole {
            payload,
            next: &b[RECORD_HEADER + len..],
        },
        None => Record::Partial,
    }
}

/// Decide on the handshake bytes gathered so far: `None` while the ClientHello is incomplete.
fn decide(hs: &[u8]) -> Option<Inspect> {
    let (&kind, header) = hs.split_first()?;
    if kind != HANDSHAKE_CLIENT_HELLO {
        return Some(Inspect::NotTls);
    }
    let len = header.get(..3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    // The message plus one record header per 16 KiB of it must fit in the bytes looked at.
    if 4 + len + RECORD_HEADER * (len / MAX_RECORD + 1) > MAX_CLIENT_HELLO {
        return Some(Inspect::TooLarge);
    }
    let body = hs.get(4..4 + len)?;
    Some(match client_hello(body) {
        Some(h) => Inspect::ClientHello(h),
        None => Inspect::NotTls,
    })
}

/// A cursor over bytes, BoringSSL's CBS in miniature: every read checks its length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn prefixed8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(usize::from(n)).map(Reader)
    }

    fn prefixed16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(Reader)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parse a ClientHello body; `None` when it is malformed.
fn client_hello(body: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(body);
    let _legacy_version = r.u16()?;
    let _random = r.take(32)?;
    let session_id = r.prefixed8()?;
    if session_id.0.len() > 32 {
        return None;
    }
    let suites = r.prefixed16()?;
    if suites.0.len() < 2 || suites.0.len() % 2 != 0 {
        return None;
    }
    let compression = r.prefixed8()?;
    if compression.is_empty() {
        return None;
    }
    let mut hello = ClientHello::default();
    // A hello without extensions ends here.
    if r.is_empty() {
        return Some(hello);
    }
    let mut exts = r.prefixed16()?;
    if !r.is_empty() {
        return None;
    }
    let mut seen: Vec<u16> = Vec::new();
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let data = exts.prefixed16()?;
        if seen.contains(&ty) {
            return None;
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => hello.sni = server_name(data),
            EXT_ALPN => hello.alpn = alpn(data).unwrap_or_default(),
            _ => {}
        }
    }
    Some(hello)
}

/// The one `host_name` of a `server_name` extension, as BoringSSL accepts it.
fn server_name(mut ext: Reader<'_>) -> Option<String> {
    let mut list = ext.prefixed16()?;
    if !ext.is_empty() {
        return None;
    }
    let kind = list.u8()?;
    let name = list.prefixed16()?;
    if !list.is_empty() || kind != 0 {
        return None;
    }
    let name = name.0;
    if name.is_empty() || name.len() > MAX_HOST_NAME || name.contains(&0) {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

/// The protocol names of an ALPN extension, or `None` when it is malformed (Envoy then
/// reports none).
fn alpn(mut ext: Reader<'_>) -> Option<Vec<String>> {
    let mut list = ext.prefixed16()?;
    if !ext.is_empty() || list.0.len() < 2 {
        return None;
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let name = list.prefixed8()?;
        if name.is_empty() {
            return None;
        }
        out.push(String::from_utf8_lossy(name.0).into_owned());
    }
    Some(out)
}

#[cfg(test)]
mod tests;
