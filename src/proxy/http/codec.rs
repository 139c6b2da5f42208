//! The HTTP/1.1 codec of the native path: pure functions over bytes, with
//! no I/O, timers or shared state, so that they can be unit-tested,
//! property-tested against `httparse` and fuzzed (`fuzz/`). It owns
//! finding the end of a head incrementally ([`HeadEnd`]), parsing a
//! request head and rewriting it for the upstream
//! ([`parse_request_head`]), parsing a response head and writing the
//! client's copy ([`parse_response_head`]), the framing decision
//! ([`Framing`]), the chunked-body scanner ([`ChunkScanner`]), strict
//! decimal lengths ([`parse_length`]) and the one hop-by-hop table both
//! wire halves use ([`HOP_BY_HOP`]). Lengths are `u64` with checked
//! arithmetic throughout.

/// Most header fields in a request or response head (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line accepted.
pub const MAX_CHUNK_LINE: u64 = 4096;

/// Hop-by-hop header fields (RFC 9110 §7.6.1), lower case: they describe
/// one connection and are never forwarded as they are. Both wire halves
/// use this table (the hyper half through
/// [`super::prepare_upstream_headers`] and [`super::strip_hop_by_hop`]).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is in [`HOP_BY_HOP`] (any case).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// Finds where a head ends (its first empty line, CRLF or bare LF line
/// endings), looking only at the bytes it has not seen yet: a head that
/// arrives one byte at a time costs one pass over its bytes, not one per
/// read. Parsers run once, on a complete head.
#[derive(Debug, Default, Clone)]
pub struct HeadEnd {
    scanned: usize,
    /// 0: inside a line; 1: just after a line feed; 2: after a line feed
    /// and a carriage return.
    state: u8,
}

impl HeadEnd {
    /// `Some(length of the head)` once `buf` holds a whole head. `buf`
    /// must begin with the bytes passed on the previous calls (more may
    /// have been appended); call [`HeadEnd::reset`] for the next head.
    pub fn find(&mut self, buf: &[u8]) -> Option<usize> {
        let start = self.scanned.min(buf.len());
        for (i, &b) in buf[start..].iter().enumerate() {
            match (b, self.state) {
                (b'\n', 1 | 2) => {
                    let end = start + i + 1;
                    self.scanned = end;
                    return Some(end);
                }
                (b'\n', _) => self.state = 1,
                (b'\r', 1) => self.state = 2,
                (b'\r', _) => {}
                _ => self.state = 0,
            }
        }
        self.scanned = buf.len();
        None
    }

    /// Starts over for the next head.
    pub fn reset(&mut self) {
        *self = HeadEnd::default();
    }
}

/// Empty lines before a request line, which RFC 9112 §2.2 lets a server
/// ignore: how many leading bytes of `buf` are CR or LF.
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// A request head the native path takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, empty line included.
    pub len: usize,
    /// The body's length (no `Content-Length`: 0).
    pub content_length: u64,
    /// The `Authorization` value, as offsets into the head.
    pub authorization: Option<(usize, usize)>,
    /// The client asked to close after this request.
    pub close: bool,
    /// `Expect: 100-continue`: the client waits for an interim answer
    /// before it sends the body.
    pub expect_continue: bool,
    /// The method is idempotent (RFC 9110 §9.2.2): sending it again after
    /// a connection was lost is harmless.
    pub idempotent: bool,
    /// `HEAD`: the answer has no body whatever its framing fields say.
    pub head_method: bool,
    /// A `POST` to the EWS endpoint (its SOAP operation is counted).
    pub ews: bool,
}

/// What [`parse_request_head`] made of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestParse {
    /// No complete head yet (only when the caller passes a partial head).
    Partial,
    /// A request the native path takes; the upstream's head is in `out`.
    Native(RequestHead),
    /// A valid request the native path leaves to the hyper half (chunked
    /// upload, `Upgrade`, HTTP/1.0, `Connection` naming fields, ...), or
    /// one `httparse` refuses (hyper answers it).
    Fallback,
    /// Refused on either half with `400` and this reason.
    Reject(&'static str),
}

/// Is this one of the methods RFC 9110 §9.2.2 calls idempotent?
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Parses the request head at the start of `buf` (complete up to an empty
/// line, see [`HeadEnd`]); when the native path can take it, also writes
/// the upstream's request head into `out`: the request line with
/// `base_path` before the target, the fields minus the hop-by-hop ones,
/// `Host`, `Expect` and `Authorization`, then `host: <host>` and the start
/// of the `Authorization` line (the token and the final CRLF are the
/// caller's).
pub fn parse_request_head(
    buf: &[u8],
    base_path: &[u8],
    host: &[u8],
    out: &mut Vec<u8>,
) -> RequestParse {
    // Uninitialised: zeroing 100 slots would cost more than parsing.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RequestParse::Partial,
        Err(_) => return RequestParse::Fallback,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return RequestParse::Fallback;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return RequestParse::Fallback;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(base_path);
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut content_length: Option<u64> = None;
    let mut authorization = None;
    let mut close = false;
    let mut expect_continue = false;
    let mut fallback = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        match request_field(name) {
            ReqField::Authorization => {
                if authorization.is_some() {
                    // Which one would the upstream's view of the
                    // request use? Neither: refused on both halves.
                    return RequestParse::Reject("more than one Authorization header");
                }
                let start = offset(buf, h.value);
                authorization = Some((start, start + h.value.len()));
                continue;
            }
            ReqField::Drop => continue,
            ReqField::Fallback => fallback = true,
            ReqField::Expect => {
                // The only expectation there is (RFC 9110 §10.1.1); the
                // hyper half answers others with 417.
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    fallback = true;
                }
                expect_continue = true;
                continue;
            }
            ReqField::Connection => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // Names more hop-by-hop fields: the hyper half
                        // strips them.
                        fallback = true;
                    }
                }
                continue;
            }
            ReqField::ContentLength => {
                let Some(n) = parse_length(h.value) else {
                    return RequestParse::Fallback;
                };
                if content_length.is_some_and(|m| m != n) {
                    return RequestParse::Fallback;
                }
                if content_length.replace(n).is_some() {
                    continue;
                }
            }
            ReqField::Keep => {}
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if fallback {
        return RequestParse::Fallback;
    }
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\nauthorization: ");
    RequestParse::Native(RequestHead {
        len,
        content_length: content_length.unwrap_or(0),
        authorization,
        close,
        expect_continue,
        idempotent: idempotent(method.as_bytes()),
        head_method: method == "HEAD",
        ews: method == "POST" && super::ews_ops::is_ews_path(path),
    })
}

enum ReqField {
    Keep,
    Drop,
    Authorization,
    Connection,
    ContentLength,
    Expect,
    Fallback,
}

/// What the native path does with a request header field: the hop-by-hop
/// table, plus the fields it handles itself.
fn request_field(name: &[u8]) -> ReqField {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    // Cheap first test on the length: most fields are none of these.
    match name.len() {
        4 if is(b"host") => ReqField::Drop,
        6 if is(b"expect") => ReqField::Expect,
        10 if is(b"connection") => ReqField::Connection,
        13 if is(b"authorization") => ReqField::Authorization,
        14 if is(b"content-length") => ReqField::ContentLength,
        // A chunked upload or a protocol switch: the hyper half's.
        7 if is(b"upgrade") => ReqField::Fallback,
        17 if is(b"transfer-encoding") => ReqField::Fallback,
        2 | 7 | 10 | 18 | 19 if is_hop_by_hop(name) => ReqField::Drop,
        _ => ReqField::Keep,
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, relayed as it is.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A response head the relay can forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Bytes of the head, empty line included.
    pub len: usize,
    /// How the body that follows is delimited.
    pub framing: Framing,
    /// The upstream closes the connection after this response.
    pub close: bool,
}

/// An upstream answer the relay will not forward (`502` before the client
/// got anything, a cut connection after).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed answer from the upstream: {0}")]
pub struct Malformed(pub &'static str);

/// Parses a response head (`Ok(None)` while incomplete) and writes the
/// client's copy of it into `out`, all but its end (see
/// [`finish_response_head`]): an HTTP/1.1 status line with the upstream's
/// code and reason, and the upstream's fields minus the hop-by-hop ones
/// and those its `Connection` names, keeping `Transfer-Encoding` (the body
/// is relayed as framed) but not a `Content-Length` beside it. Framing
/// that could be read two ways is refused (RFC 9112 §6): a transfer coding
/// in an HTTP/1.0 answer, conflicting lengths, and a `Connection` field
/// that names `Content-Length` or `Transfer-Encoding` (the client's copy
/// would lose the field the relay frames by).
pub fn parse_response_head(
    buf: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, Malformed> {
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Malformed("unparsable head")),
    };
    let status = res.code.ok_or(Malformed("no status"))?;
    let http10 = res.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = http10;
    // Fields the upstream's `Connection` names, beyond close/keep-alive.
    let mut named: Vec<&[u8]> = Vec::new();
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(Malformed("invalid Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if http10 {
                return Err(Malformed("Transfer-Encoding in an HTTP/1.0 answer"));
            }
            // The last coding decides.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if http10 {
                        close = false;
                    }
                } else if token.eq_ignore_ascii_case(b"content-length")
                    || token.eq_ignore_ascii_case(b"transfer-encoding")
                {
                    return Err(Malformed("Connection names a framing field"));
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    if framing == Framing::Close {
        close = true;
    }

    // "HTTP/1.x" becomes "HTTP/1.1"; the code and reason stay as sent.
    let line = buf[..len]
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Malformed("no status line"))?;
    let line = buf[..line].strip_suffix(b"\r").unwrap_or(&buf[..line]);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1");
    out.extend_from_slice(line.get(8..).ok_or(Malformed("short status line"))?);
    out.extend_from_slice(b"\r\n");
    // With a transfer coding the length is not the message's (RFC 9112
    // §6.3): passing both on would invite request smuggling downstream.
    let coded = chunked.is_some();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let hop = is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"transfer-encoding");
        if hop
            || (coded && name.eq_ignore_ascii_case(b"content-length"))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    Ok(Some(ResponseHead {
        status,
        len,
        framing,
        close,
    }))
}

/// Ends the client's copy of a response head, with `connection: close`
/// when the client connection ends after it.
pub fn finish_response_head(out: &mut Vec<u8>, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Looks a field up in a complete head (request or response), for the
/// rare answers whose fields matter after the relay decided (a refusal's
/// `Retry-After` and explanation). `None` when absent or unparsable.
pub fn header_value<'b>(head: &'b [u8], name: &str) -> Option<&'b [u8]> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    res.parse(head).ok()?;
    res.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A strict decimal length: ASCII digits only (surrounding blanks
/// allowed), no sign, no overflow.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn offset(base: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in the bytes relayed so
/// far, without changing them. Strict: CRLF line endings only (a bare LF
/// anywhere in the framing is refused), hexadecimal sizes that fit in a
/// `u64`, size and trailer lines of at most [`MAX_CHUNK_LINE`] bytes.
#[derive(Debug, Default, Clone)]
pub struct ChunkScanner {
    state: Chunk,
    /// Data bytes left in the current chunk.
    left: u64,
    /// Length of the current size or trailer line.
    line: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    /// Whitespace after the size: only more of it, `;` or the line end
    /// may follow.
    SizeWs,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (an empty one ends the body).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScanner {
    /// Scans `buf` (the bytes after those already scanned); `Some(n)` when
    /// the body ends after `n` of them.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Chunk::Size => {
                    self.line += 1;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                            self.left = self
                                .left
                                .checked_mul(16)
                                .and_then(|v| v.checked_add(digit))
                                .ok_or(Malformed("chunk size too large"))?;
                        }
                        b';' if self.line > 1 => self.state = Chunk::Extension,
                        b' ' | b'\t' if self.line > 1 => self.state = Chunk::SizeWs,
                        b'\r' if self.line > 1 => self.state = Chunk::SizeLf,
                        _ => return Err(Malformed("invalid chunk size")),
                    }
                }
                Chunk::SizeWs => {
                    self.line += 1;
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = Chunk::Extension,
                        b'\r' => self.state = Chunk::SizeLf,
                        _ => return Err(Malformed("invalid chunk size")),
                    }
                }
                Chunk::Extension => {
                    self.line += 1;
                    match b {
                        b'\r' => self.state = Chunk::SizeLf,
                        b'\n' => return Err(Malformed("bare LF in a chunk extension")),
                        _ => {}
                    }
                }
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed("chunk size line"));
                    }
                    self.line = 0;
                    self.state = if self.left == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    };
                }
                Chunk::Data => {
                    let rest = (buf.len() - i) as u64;
                    let take = self.left.min(rest);
                    self.left -= take;
                    // `take` is at most `rest`, a length of `buf`.
                    i += take as usize;
                    if self.left == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => {
                    if b != b'\r' {
                        return Err(Malformed("missing CRLF after chunk data"));
                    }
                    self.state = Chunk::DataLf;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err(Malformed("missing CRLF after chunk data"));
                    }
                    self.state = Chunk::Size;
                }
                Chunk::TrailerStart => {
                    self.line = 1;
                    self.state = match b {
                        b'\r' => Chunk::EndLf,
                        b'\n' => return Err(Malformed("bare LF in the trailer")),
                        _ => Chunk::Trailer,
                    };
                }
                Chunk::Trailer => {
                    self.line += 1;
                    match b {
                        b'\r' => self.state = Chunk::TrailerLf,
                        b'\n' => return Err(Malformed("bare LF in the trailer")),
                        _ => {}
                    }
                }
                Chunk::TrailerLf => {
                    if b != b'\n' {
                        return Err(Malformed("trailer line"));
                    }
                    self.state = Chunk::TrailerStart;
                }
                Chunk::EndLf => {
                    if b != b'\n' {
                        return Err(Malformed("last chunk"));
                    }
                    self.state = Chunk::Done;
                    return Ok(Some(i + 1));
                }
                Chunk::Done => return Ok(Some(i)),
            }
            if self.line > MAX_CHUNK_LINE {
                return Err(Malformed("chunk size or trailer line too long"));
            }
            i += 1;
        }
        Ok((self.state == Chunk::Done).then_some(buf.len()))
    }

    /// Data bytes still to come in the current chunk (a read-size hint).
    pub fn data_left(&self) -> u64 {
        self.left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8], step: usize) -> Result<Option<usize>, Malformed> {
        let mut s = ChunkScanner::default();
        let mut at = 0;
        while at < body.len() {
            let end = (at + step).min(body.len());
            if let Some(n) = s.scan(&body[at..end])? {
                return Ok(Some(at + n));
            }
            at = end;
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_whatever_the_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(
                scan_all(body, step).unwrap(),
                Some(body.len() - 4),
                "step {step}"
            );
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 1).unwrap(), Some(5));
        assert_eq!(scan_all(b"5\r\nhel", 1).unwrap(), None);
        for broken in [&b"g\r\n"[..], b"5\r\nhelloXY", b"\r\n", b"5\nhello"] {
            assert!(scan_all(broken, 1).is_err(), "{broken:?}");
        }
        let long = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE as usize + 1));
        assert!(scan_all(long.as_bytes(), 64).is_err());
        assert!(scan_all(b"fffffffffffffffffff\r\n", 4).is_err());
    }

    #[test]
    fn only_whitespace_then_an_extension_may_follow_a_chunk_size() {
        let scan = |b: &[u8]| ChunkScanner::default().scan(b);
        assert_eq!(scan(b"1 \t ;x\r\na\r\n0\r\n\r\n"), Ok(Some(16)));
        assert_eq!(scan(b"1  \r\na\r\n0\r\n\r\n"), Ok(Some(13)));
        // Found by the property test against httparse: a space does not
        // start an extension.
        assert!(scan(b"1 a;x\r\na\r\n0\r\n\r\n").is_err());
        assert!(scan(b"1 2\r\na\r\n0\r\n\r\n").is_err());
    }

    #[test]
    fn a_bare_lf_anywhere_in_chunked_framing_is_refused() {
        // A trailer ending in a bare LF used to leave the relay waiting
        // for an end that never came.
        for broken in [
            &b"0\r\nx-sum: 1\n\r\n"[..],
            b"0\r\nx-sum: 1\r\n\n",
            b"0\r\n\n",
            b"5;a\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
        ] {
            for step in [1, 100] {
                assert!(scan_all(broken, step).is_err(), "{broken:?} step {step}");
            }
        }
    }

    #[test]
    fn head_ends_are_found_once_whatever_the_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        for step in [1, 2, 5, 100] {
            let mut end = HeadEnd::default();
            let mut found = None;
            let mut at = 0;
            while found.is_none() && at < head.len() {
                at = (at + step).min(head.len());
                found = end.find(&head[..at]);
            }
            assert_eq!(found, Some(head.len() - 4), "step {step}");
        }
        // A 60 KB head fed one byte at a time: each byte is looked at once.
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        while big.len() < 60_000 {
            big.extend_from_slice(b"X-Filler: abcdefghijklmnopqrstuvwxyz\r\n");
        }
        big.extend_from_slice(b"\r\n");
        let mut end = HeadEnd::default();
        for n in 1..big.len() {
            assert_eq!(end.find(&big[..n]), None);
            assert_eq!(end.scanned, n, "nothing looked at twice");
        }
        assert_eq!(end.find(&big), Some(big.len()));

        let mut end = HeadEnd::default();
        assert_eq!(end.find(b"GET / HTTP/1.1\nHost: x\n\nX"), Some(24));
        end.reset();
        assert_eq!(end.find(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(end.find(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(27));
    }

    fn rewrite(head: &str) -> (RequestParse, String) {
        let mut out = Vec::new();
        let p = parse_request_head(head.as_bytes(), b"/base", b"up.example", &mut out);
        (p, String::from_utf8(out).unwrap())
    }

    #[test]
    fn request_heads_are_rewritten_for_the_upstream() {
        let (p, out) = rewrite(
            "POST /EWS/Exchange.asmx?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic YTpi\r\n\
             Content-Length: 3\r\nTE: trailers\r\nKeep-Alive: 5\r\nExpect: 100-continue\r\nSOAPAction: x\r\n\r\nabc",
        );
        let RequestParse::Native(h) = p else {
            panic!("{p:?}")
        };
        assert_eq!(h.content_length, 3);
        assert!(h.expect_continue && !h.idempotent && !h.close);
        assert_eq!(
            out,
            "POST /base/EWS/Exchange.asmx?x=1 HTTP/1.1\r\nContent-Length: 3\r\nSOAPAction: x\r\nhost: up.example\r\nauthorization: "
        );
    }

    #[test]
    fn requests_the_native_half_leaves_to_hyper_or_refuses() {
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-private\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: something\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(rewrite(head).0, RequestParse::Fallback, "{head}");
        }
        assert_eq!(
            rewrite(
                "GET / HTTP/1.1\r\nAuthorization: Basic YTpi\r\nauthorization: Basic Yzpk\r\n\r\n"
            )
            .0,
            RequestParse::Reject("more than one Authorization header")
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |head: &str, head_req: bool| {
            parse_response_head(head.as_bytes(), head_req, &mut Vec::new())
                .ok()
                .flatten()
                .map(|r| (r.framing, r.close))
        };
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Some((Framing::Length(5), false))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Some((Framing::Empty, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                false
            ),
            Some((Framing::Close, true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((Framing::Close, true))
        );
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\n\r\n", false),
            Some((Framing::Empty, false))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            Some((Framing::Length(1), true))
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                false
            ),
            Some((Framing::Length(1), false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
                false
            ),
            Some((Framing::Length(1), true))
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n", false), None);
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            // Ambiguous framing (RFC 9112 §6.1, §6.3).
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nconnection: close, Transfer-Encoding\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response_head(bad.as_bytes(), false, &mut Vec::new()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields() {
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 Fine\r\nConnection: x-private, keep-alive\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n";
        let r = parse_response_head(head, false, &mut out).unwrap().unwrap();
        assert_eq!(
            (r.len, r.framing, r.close),
            (head.len(), Framing::Chunked, false)
        );
        finish_response_head(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            header_value(head, "x-kept"),
            Some(&b"yes"[..]),
            "fields can be looked up afterwards"
        );
    }

    #[test]
    fn lengths_are_strict_u64() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1e3",
            b"0x10",
            b"18446744073709551616",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }

    mod properties {
        //! Property tests over the codec, with a differential check: where
        //! httparse also reads the same bytes, the codec agrees on every
        //! message boundary or refuses the message.
        use super::super::*;
        use super::scan_all;
        use proptest::prelude::*;

        fn line_end() -> impl Strategy<Value = &'static str> {
            prop_oneof![Just("\r\n"), Just("\n")]
        }

        fn field() -> impl Strategy<Value = (String, String)> {
            (
                prop_oneof![
                    Just("Host".to_owned()),
                    Just("authorization".to_owned()),
                    Just("Content-Length".to_owned()),
                    Just("Connection".to_owned()),
                    Just("Transfer-Encoding".to_owned()),
                    Just("Expect".to_owned()),
                    Just("TE".to_owned()),
                    "[A-Za-z][A-Za-z0-9-]{0,12}",
                ],
                "[ -~]{0,24}",
            )
        }

        /// A request head, maybe damaged, and bytes after it.
        fn request() -> impl Strategy<Value = Vec<u8>> {
            (
                prop_oneof![
                    Just("GET".to_owned()),
                    Just("POST".to_owned()),
                    Just("HEAD".to_owned()),
                    "[A-Z]{1,7}",
                ],
                "/[!-~]{0,20}",
                prop_oneof![
                    Just("HTTP/1.1".to_owned()),
                    Just("HTTP/1.0".to_owned()),
                    "HTTP/[0-9].[0-9]",
                ],
                proptest::collection::vec(field(), 0..8),
                line_end(),
                proptest::collection::vec(any::<u8>(), 0..16),
                proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
            )
                .prop_map(|(method, path, version, fields, eol, tail, damage)| {
                    let mut b = format!("{method} {path} {version}{eol}");
                    for (n, v) in fields {
                        b.push_str(&format!("{n}: {v}{eol}"));
                    }
                    b.push_str(eol);
                    let mut b = b.into_bytes();
                    if let Some((at, byte)) = damage {
                        let i = at.index(b.len());
                        b[i] = byte;
                    }
                    b.extend(tail);
                    b
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn request_heads_end_where_httparse_says_or_are_refused(b in request()) {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                let theirs = req.parse(&b);
                let ours = HeadEnd::default().find(&b);
                if let Ok(httparse::Status::Complete(n)) = theirs {
                    prop_assert_eq!(ours, Some(n));
                }
                if let Some(end) = ours {
                    let mut out = Vec::new();
                    if let RequestParse::Native(h) = parse_request_head(&b[..end], b"", b"up", &mut out) {
                        prop_assert_eq!(h.len, end);
                        prop_assert_eq!(theirs.ok(), Some(httparse::Status::Complete(end)));
                    }
                }
            }

            #[test]
            fn response_heads_end_where_httparse_says_or_are_refused(
                status in 100u16..600,
                fields in proptest::collection::vec(field(), 0..8),
                eol in line_end(),
                tail in proptest::collection::vec(any::<u8>(), 0..16),
                head_request in any::<bool>(),
            ) {
                let mut b = format!("HTTP/1.1 {status} Reason{eol}");
                for (n, v) in fields {
                    b.push_str(&format!("{n}: {v}{eol}"));
                }
                b.push_str(eol);
                let mut b = b.into_bytes();
                b.extend(tail);
                let end = HeadEnd::default().find(&b);
                prop_assert!(end.is_some());
                let end = end.unwrap_or_default();
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut res = httparse::Response::new(&mut headers);
                let theirs = res.parse(&b);
                if let Ok(Some(r)) = parse_response_head(&b[..end], head_request, &mut Vec::new()) {
                    prop_assert_eq!(r.len, end);
                    prop_assert_eq!(theirs.ok(), Some(httparse::Status::Complete(end)));
                }
            }

            #[test]
            fn chunked_bodies_end_where_a_reference_reader_says_or_are_refused(
                chunks in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 1..40), proptest::option::of("[a-z=;]{1,8}")), 0..6),
                trailers in proptest::collection::vec("[a-z]{1,8}: [ -~]{0,8}", 0..3),
                tail in proptest::collection::vec(any::<u8>(), 0..8),
                damage in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
                step in 1usize..17,
            ) {
                let mut b = Vec::new();
                for (data, ext) in &chunks {
                    b.extend(format!("{:x}", data.len()).bytes());
                    if let Some(e) = ext {
                        b.push(b';');
                        b.extend(e.bytes());
                    }
                    b.extend(b"\r\n");
                    b.extend(data);
                    b.extend(b"\r\n");
                }
                b.extend(b"0\r\n");
                for t in &trailers {
                    b.extend(t.bytes());
                    b.extend(b"\r\n");
                }
                b.extend(b"\r\n");
                let encoded = b.len();
                b.extend(&tail);
                if damage.is_none() {
                    prop_assert_eq!(scan_all(&b, step).ok(), Some(Some(encoded)));
                }
                if let Some((at, byte)) = damage {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
                let ours = scan_all(&b, step);
                prop_assert_eq!(&ours, &scan_all(&b, b.len().max(1)), "reads do not matter");
                if let Ok(Some(n)) = ours {
                    prop_assert_eq!(reference_end(&b), Some(n));
                }
            }

            #[test]
            fn lengths_agree_with_the_standard_parser(v in "[0-9]{1,22}") {
                prop_assert_eq!(parse_length(v.as_bytes()), v.parse::<u64>().ok());
            }
        }

        /// Where a chunked body ends, read with httparse's chunk-size
        /// parser and strict CRLF line ends; `None` when malformed.
        fn reference_end(b: &[u8]) -> Option<usize> {
            let mut pos = 0;
            loop {
                let size_line_end = b[pos..].windows(2).position(|w| w == b"\r\n")? + pos;
                if b[pos..size_line_end].contains(&b'\n') {
                    return None;
                }
                let (used, size) = match httparse::parse_chunk_size(&b[pos..]) {
                    Ok(httparse::Status::Complete(v)) => v,
                    _ => return None,
                };
                if pos + used != size_line_end + 2 {
                    return None;
                }
                pos += used;
                if size == 0 {
                    break;
                }
                pos = pos.checked_add(usize::try_from(size).ok()?)?;
                if b.get(pos..pos + 2)? != b"\r\n" {
                    return None;
                }
                pos += 2;
            }
            // Trailer lines, then the empty line.
            loop {
                let rel = b[pos..].windows(2).position(|w| w == b"\r\n")?;
                let line = &b[pos..pos + rel];
                if line.contains(&b'\n') || line.contains(&b'\r') {
                    return None;
                }
                pos += rel + 2;
                if line.is_empty() {
                    return Some(pos);
                }
            }
        }
    }
}
