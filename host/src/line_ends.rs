//! Strict line ends in HTTP/1 request heads. hyper (through httparse) accepts a bare LF as a line end, which RFC 9112
//! allows but which is how requests are smuggled past a front proxy that splits lines only at CRLF: what it sees as
//! one header value, we would read as two headers. [`LineEnds`] follows the framing of the client's byte stream (the
//! heads, and the bodies by their `Content-Length` or chunks, so body bytes are never mistaken for a head) and turns
//! any bare LF of a request head or trailer into a NUL byte, which hyper then refuses with a 400 and a closed
//! connection. It edits bytes in place (lengths unchanged) and only ever makes a request invalid; on anything it does
//! not follow (HTTP/2, CONNECT, a framing hyper refuses anyway) it stops looking and leaves hyper to judge. It sees
//! the bytes through [`crate::client_io::ClientIo`].

/// The longest partial line carried from one read to the next; hyper refuses heads far shorter than this.
const MAX_CARRIED: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a request head (`in_trailers`: in the trailer section after the last chunk).
    Head { in_trailers: bool },
    /// Inside a body of known length: this many bytes left.
    Fixed(u64),
    /// In a chunk-size line.
    ChunkSize,
    /// Inside a chunk's data: this many bytes left, then its CRLF.
    ChunkData(u64),
    /// The CRLF after a chunk's data: this many bytes of it left.
    ChunkEnd(u8),
    /// Not followed any more: HTTP/2, CONNECT, or a framing hyper refuses (and so closes the connection).
    Off,
}

/// What the head being read says about the body that follows.
#[derive(Debug, Default, Clone)]
struct HeadInfo {
    lines: u32,
    content_length: Option<u64>,
    chunked: bool,
    /// CONNECT, HTTP/2's preface, a conflicting or invalid length, a final transfer coding other than `chunked`.
    unfollowable: bool,
}

/// Follows one client connection's bytes; see the module doc.
#[derive(Debug)]
pub struct LineEnds {
    state: State,
    head: HeadInfo,
    /// The start of a line split across reads.
    carry: Vec<u8>,
    /// Bare LFs found (each made the request invalid).
    pub bare_lfs: u64,
}

impl Default for LineEnds {
    fn default() -> Self {
        LineEnds {
            state: State::Head { in_trailers: false },
            head: HeadInfo::default(),
            carry: Vec::new(),
            bare_lfs: 0,
        }
    }
}

/// The value of a `name:` header line, trimmed (None if the line is another header).
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let n = name.len();
    if line.len() <= n || !line[..n].eq_ignore_ascii_case(name) || line[n] != b':' {
        return None;
    }
    Some(line[n + 1..].trim_ascii())
}

impl LineEnds {
    /// Scans the next bytes read from the client, replacing each bare LF of a head with a NUL.
    pub fn scan(&mut self, bytes: &mut [u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Off => return,
                State::Fixed(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take { self.next_head() } else { State::Fixed(left - take) };
                }
                State::ChunkData(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take { State::ChunkEnd(2) } else { State::ChunkData(left - take) };
                }
                State::ChunkEnd(left) => {
                    i += 1;
                    self.state = if left == 1 { State::ChunkSize } else { State::ChunkEnd(left - 1) };
                }
                State::Head { .. } | State::ChunkSize => {
                    let rest = &mut bytes[i..];
                    let Some(at) = memchr::memchr(b'\n', rest) else {
                        if self.carry.len() + rest.len() > MAX_CARRIED {
                            self.state = State::Off;
                        } else {
                            self.carry.extend_from_slice(rest);
                        }
                        return;
                    };
                    let mut line = std::mem::take(&mut self.carry);
                    let ends_in_cr = if line.is_empty() {
                        at > 0 && rest[at - 1] == b'\r'
                    } else {
                        line.extend_from_slice(&rest[..at]);
                        line.last() == Some(&b'\r')
                    };
                    if !ends_in_cr && matches!(self.state, State::Head { .. }) {
                        // the one edit: hyper refuses the head (400) and closes the connection
                        rest[at] = 0;
                        self.bare_lfs += 1;
                        self.state = State::Off;
                        return;
                    }
                    let content = if line.is_empty() { &rest[..at] } else { &line[..] };
                    let content = content.strip_suffix(b"\r").unwrap_or(content);
                    self.state = self.after_line(content);
                    line.clear();
                    self.carry = line;
                    i += at + 1;
                }
            }
        }
    }

    /// The state after a body: the next request's head.
    fn next_head(&mut self) -> State {
        self.head = HeadInfo::default();
        State::Head { in_trailers: false }
    }

    /// The state after a complete line (without its line end) of a head or a chunk size.
    fn after_line(&mut self, line: &[u8]) -> State {
        let in_trailers = match self.state {
            State::ChunkSize => {
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                let size = std::str::from_utf8(&line[..digits]).ok().and_then(|s| u64::from_str_radix(s, 16).ok());
                return match size {
                    Some(0) => State::Head { in_trailers: true },
                    Some(n) => State::ChunkData(n),
                    // no size, or an overflow: hyper refuses the body (the proxy answers 400) and the connection
                    None => State::Off,
                };
            }
            State::Head { in_trailers } => in_trailers,
            other => return other,
        };
        if line.is_empty() {
            return if in_trailers {
                self.next_head()
            } else if self.head.lines == 0 {
                // empty lines before a request line are skipped
                self.state
            } else {
                self.body()
            };
        }
        if in_trailers {
            return self.state;
        }
        self.head.lines += 1;
        let head = &mut self.head;
        if head.lines == 1 {
            // the request line: tunnels and HTTP/2 are not followed
            head.unfollowable = line.starts_with(b"CONNECT ") || line.starts_with(b"PRI ");
        } else if let Some(v) = header_value(line, b"content-length") {
            let n = std::str::from_utf8(v).ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
            match n.and_then(|s| s.parse::<u64>().ok()) {
                Some(n) if head.content_length.is_none_or(|m| m == n) => head.content_length = Some(n),
                _ => head.unfollowable = true,
            }
        } else if let Some(v) = header_value(line, b"transfer-encoding") {
            let last = v.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii();
            head.chunked = last.eq_ignore_ascii_case(b"chunked");
            head.unfollowable |= !head.chunked;
        }
        self.state
    }

    /// The state after a complete head: its body, or the next head.
    fn body(&mut self) -> State {
        let head = std::mem::take(&mut self.head);
        if head.unfollowable {
            return State::Off;
        }
        match (head.chunked, head.content_length) {
            (true, _) => State::ChunkSize,
            (false, Some(n)) if n > 0 => State::Fixed(n),
            _ => State::Head { in_trailers: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Scans `stream` cut at `cuts`; the bytes as hyper would see them.
    fn scanned(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, LineEnds) {
        let mut s = LineEnds::default();
        let mut out = stream.to_vec();
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            let c = c.clamp(start, stream.len());
            s.scan(&mut out[start..c]);
            start = c;
        }
        (out, s)
    }

    const PIPELINE: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nline1\nline2\n\
        POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\nab\ncd\n\r\n3;ext=1\r\n\n\n\n\r\n0\r\nX-T: 1\r\n\r\n\
        GET /d HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn bodies_may_hold_bare_lfs_and_valid_heads_pass_untouched() {
        let (out, s) = scanned(PIPELINE, &[]);
        assert_eq!(out, PIPELINE);
        assert_eq!(s.bare_lfs, 0);
        assert_eq!(s.state, State::Head { in_trailers: false }, "followed to the end");
    }

    #[test]
    fn a_bare_lf_in_a_header_is_made_invalid() {
        let req = b"GET / HTTP/1.1\r\nHost: x\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, s) = scanned(req, &[]);
        assert_eq!(s.bare_lfs, 1);
        let at = req.iter().position(|&b| b == b'x').unwrap() + 1;
        assert_eq!((req[at], out[at]), (b'\n', 0), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn a_bare_lf_ending_the_request_line_or_the_head_is_made_invalid() {
        for req in [
            &b"GET / HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
            b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\n\n",
        ] {
            let (out, s) = scanned(req, &[]);
            assert_eq!(s.bare_lfs, 1, "{:?}", String::from_utf8_lossy(req));
            assert!(out.contains(&0));
        }
    }

    #[test]
    fn a_bare_lf_in_the_next_request_after_a_body_is_found() {
        let req = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nbGET / HTTP/1.1\r\nHost: x\nA: b\r\n\r\n";
        assert_eq!(scanned(req, &[]).1.bare_lfs, 1);
    }

    #[test]
    fn a_bare_lf_in_trailers_is_made_invalid() {
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: 1\nY: 2\r\n\r\n";
        assert_eq!(scanned(req, &[]).1.bare_lfs, 1);
    }

    #[test]
    fn tunnels_http2_and_unknown_codings_are_left_to_hyper() {
        for req in [
            &b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n\n\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\n\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n\n\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n\n\n",
        ] {
            let (out, s) = scanned(req, &[]);
            assert_eq!((out.as_slice(), s.bare_lfs), (req, 0), "{:?}", String::from_utf8_lossy(req));
            assert_eq!(s.state, State::Off);
        }
    }

    proptest! {
        /// However the stream is cut into reads, valid pipelined requests pass untouched and a bare LF is found.
        #[test]
        fn any_read_boundaries_give_the_same_verdict(cuts in proptest::collection::vec(0usize..PIPELINE.len(), 0..8)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (out, s) = scanned(PIPELINE, &cuts);
            prop_assert_eq!(out.as_slice(), PIPELINE);
            prop_assert_eq!(s.bare_lfs, 0);
            let mut bad = PIPELINE.to_vec();
            bad.extend_from_slice(b"GET /e HTTP/1.1\r\nHost: x\nA: 1\r\n\r\n");
            let (_, s) = scanned(&bad, &cuts);
            prop_assert_eq!(s.bare_lfs, 1);
        }
    }
}
