//! The HTTP/2 wire format (RFC 9113 §4 and §6): frame heads, the frame types and flags the
//! server reads and writes, error codes and settings. No state: [`super::conn`] holds that.

/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame head's length.
pub(crate) const HEAD_LEN: usize = 9;
/// The protocol's default and smallest SETTINGS_MAX_FRAME_SIZE.
pub(crate) const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE a peer may announce.
pub(crate) const MAX_MAX_FRAME: u32 = (1 << 24) - 1;
/// The initial flow-control window of a stream and of the connection.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;
/// The largest window a WINDOW_UPDATE or SETTINGS_INITIAL_WINDOW_SIZE may make.
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

pub(crate) const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub(crate) const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub(crate) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub(crate) const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes (RFC 9113 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reason(pub(crate) u32);

impl Reason {
    pub(crate) const NO_ERROR: Reason = Reason(0x0);
    pub(crate) const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub(crate) const INTERNAL_ERROR: Reason = Reason(0x2);
    pub(crate) const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub(crate) const STREAM_CLOSED: Reason = Reason(0x5);
    pub(crate) const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub(crate) const REFUSED_STREAM: Reason = Reason(0x7);
    pub(crate) const CANCEL: Reason = Reason(0x8);
    pub(crate) const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub(crate) const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
}

/// A frame head as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) len: usize,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

impl Head {
    /// Reads a head from the first [`HEAD_LEN`] bytes of `b` (which must hold them).
    pub(crate) fn parse(b: &[u8]) -> Head {
        Head {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Appends a frame head.
pub(crate) fn write_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_MAX_FRAME as usize);
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Appends a SETTINGS frame with `values`.
pub(crate) fn write_settings(out: &mut Vec<u8>, values: &[(u16, u32)]) {
    write_head(out, values.len() * 6, SETTINGS, 0, 0);
    for &(id, v) in values {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub(crate) fn write_settings_ack(out: &mut Vec<u8>) {
    write_head(out, 0, SETTINGS, ACK, 0);
}

pub(crate) fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    write_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

pub(crate) fn write_rst_stream(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    write_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&reason.0.to_be_bytes());
}

pub(crate) fn write_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    write_head(out, 8, GOAWAY, 0, 0);
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&reason.0.to_be_bytes());
}

pub(crate) fn write_ping(out: &mut Vec<u8>, ack: bool, payload: [u8; 8]) {
    write_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.extend_from_slice(&payload);
}

/// Appends a header block as a HEADERS frame and as many CONTINUATION frames as `max_frame`
/// requires.
pub(crate) fn write_headers(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let rest = block.len() - first.len();
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if rest == 0 {
        flags |= END_HEADERS;
    }
    write_head(out, first.len(), HEADERS, flags, stream);
    out.extend_from_slice(first);
    let mut left = rest;
    for chunk in chunks {
        left -= chunk.len();
        let flags = if left == 0 { END_HEADERS } else { 0 };
        write_head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

/// Strips a padded frame's padding (RFC 9113 §6.1): the payload without the pad-length byte and
/// the padding, or `None` if the padding is as long as the payload or longer.
pub(crate) fn unpad(head: &Head, payload: &[u8]) -> Option<(usize, usize)> {
    if !head.has(PADDED) {
        return Some((0, payload.len()));
    }
    let pad = usize::from(*payload.first()?);
    let end = payload.len().checked_sub(pad)?;
    (end >= 1).then_some((1, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_read_back_as_written() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            0x01_0203,
            HEADERS,
            END_STREAM | END_HEADERS,
            0x7fff_fffe,
        );
        assert_eq!(
            Head::parse(&out),
            Head {
                len: 0x01_0203,
                kind: HEADERS,
                flags: END_STREAM | END_HEADERS,
                stream: 0x7fff_fffe
            }
        );
        // The reserved bit is not part of the stream id.
        out[5] |= 0x80;
        assert_eq!(Head::parse(&out).stream, 0x7fff_fffe);
    }

    #[test]
    fn a_large_block_continues_in_frames_of_the_largest_size() {
        let block: Vec<u8> = (0..=255u8).cycle().take(40_000).collect();
        let mut out = Vec::new();
        write_headers(&mut out, 3, &block, true, DEFAULT_MAX_FRAME);
        let mut at = 0;
        let mut got = Vec::new();
        let mut heads = Vec::new();
        while at < out.len() {
            let h = Head::parse(&out[at..]);
            got.extend_from_slice(&out[at + HEAD_LEN..at + HEAD_LEN + h.len]);
            at += HEAD_LEN + h.len;
            heads.push(h);
        }
        assert_eq!(got, block);
        assert_eq!(heads.len(), 3);
        assert_eq!((heads[0].kind, heads[0].flags), (HEADERS, END_STREAM));
        assert_eq!((heads[1].kind, heads[1].flags), (CONTINUATION, 0));
        assert_eq!((heads[2].kind, heads[2].flags), (CONTINUATION, END_HEADERS));
        assert!(
            heads
                .iter()
                .all(|h| h.stream == 3 && h.len <= DEFAULT_MAX_FRAME)
        );

        out.clear();
        write_headers(&mut out, 1, b"ab", false, DEFAULT_MAX_FRAME);
        assert_eq!(Head::parse(&out).flags, END_HEADERS);
    }

    #[test]
    fn padding_is_stripped_or_refused() {
        let head = |flags| Head {
            len: 0,
            kind: DATA,
            flags,
            stream: 1,
        };
        assert_eq!(unpad(&head(0), b"abc"), Some((0, 3)));
        assert_eq!(unpad(&head(PADDED), b"\x02abcd"), Some((1, 3)));
        assert_eq!(unpad(&head(PADDED), b"\x00"), Some((1, 1)));
        assert_eq!(unpad(&head(PADDED), b"\x04abcd"), Some((1, 1)));
        assert_eq!(unpad(&head(PADDED), b"\x05abcd"), None);
        assert_eq!(unpad(&head(PADDED), b""), None);
    }
}
