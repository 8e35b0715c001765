//! HPACK (RFC 7541), the header compression of HTTP/2: the decoder for request header blocks
//! and a stateless encoder for response header blocks.
//!
//! The connection layer hands [`Decoder::decode`] each complete header block (a HEADERS frame's
//! fragment and its CONTINUATIONs, concatenated) and gets the fields back in a [`HeaderList`],
//! copied into one buffer that it reuses from request to request. A [`Decoder`] holds the dynamic
//! table of one connection, so it must see every block of that connection, in order. Every
//! [`DecodeError`] is a connection error of type COMPRESSION_ERROR. Field names are not checked
//! here (pseudo-headers, upper case and connection-specific fields are the connection layer's
//! business).
//!
//! Responses are encoded by [`encode_status`] and [`encode_field`], which never add to the
//! peer's dynamic table: the encoder keeps no state, and never has to send a table size update.
//! Strings go out without Huffman coding, which costs a few bytes and saves the time to code
//! them.

#[path = "hpack_huffman.rs"]
mod huffman;

#[cfg(test)]
#[path = "hpack_tests.rs"]
mod tests;

use std::collections::VecDeque;

/// Why a header block could not be decoded.
///
/// Every decoding error is a connection error of type COMPRESSION_ERROR in HTTP/2: the dynamic
/// table is out of step with the peer's from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The block ends inside an integer.
    #[error("hpack integer truncated by the end of the header block")]
    TruncatedInteger,
    /// An integer takes more than 5 bytes after its prefix (the most any 32-bit value needs).
    #[error("hpack integer too large")]
    IntegerOverflow,
    /// A string literal's length goes past the end of the block.
    #[error("hpack string truncated by the end of the header block")]
    TruncatedString,
    /// An indexed field or name with index 0.
    #[error("hpack index 0")]
    IndexZero,
    /// An index past the static table and the entries of the dynamic table.
    #[error("hpack index past the static and dynamic tables")]
    IndexOutOfRange,
    /// A dynamic table size update above the SETTINGS_HEADER_TABLE_SIZE this endpoint advertised.
    #[error("hpack table size update above the advertised maximum")]
    TableSizeAboveMaximum,
    /// A dynamic table size update after the first field of the block.
    #[error("hpack table size update not at the start of the header block")]
    LateTableSizeUpdate,
    /// A Huffman-coded string contains the EOS symbol.
    #[error("huffman-coded string contains the eos symbol")]
    HuffmanEos,
    /// A Huffman-coded string ends with 8 or more bits that are not a whole code.
    #[error("huffman padding longer than 7 bits")]
    HuffmanPaddingTooLong,
    /// A Huffman-coded string ends with padding that is not all ones (a prefix of EOS).
    #[error("huffman padding not all ones")]
    HuffmanPaddingNotOnes,
}

/// The static table (RFC 7541 Appendix A); index `i` of the spec is `STATIC_TABLE[i - 1]`.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// How much a field counts toward the table size and the header list size: its name and value
/// plus 32 (RFC 7541 §4.1, RFC 9113 §6.5.2).
const ENTRY_OVERHEAD: usize = 32;

/// A decoded header list: every name and value copied into one buffer, in the order sent.
#[derive(Debug, Default)]
pub(crate) struct HeaderList {
    /// Each field's name then value, back to back.
    buf: Vec<u8>,
    /// Each field's `(start, name end, value end)` in `buf`.
    fields: Vec<(usize, usize, usize)>,
    /// The list's size in the sense of SETTINGS_MAX_HEADER_LIST_SIZE so far.
    size: usize,
    too_large: bool,
    /// The room (`buf`, `fields`) that [`HeaderList::release`] gave back, taken again when
    /// the list is next filled.
    room: (usize, usize),
}

impl HeaderList {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Empties the list, giving its allocations back but remembering their size for the next
    /// time it is filled (an idle connection's list holds nothing).
    pub(crate) fn release(&mut self) {
        let room = (self.buf.capacity(), self.fields.capacity());
        *self = HeaderList {
            room,
            ..Self::default()
        };
    }

    /// Empties the list, keeping its allocations (or taking back the room it released).
    pub(crate) fn clear(&mut self) {
        if self.buf.capacity() == 0 && self.room.0 > 0 {
            self.buf.reserve_exact(self.room.0);
            self.fields.reserve_exact(self.room.1);
        }
        self.buf.clear();
        self.fields.clear();
        self.size = 0;
        self.too_large = false;
    }

    /// The number of fields.
    pub(crate) fn len(&self) -> usize {
        self.fields.len()
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields as `(name, value)`, in the order sent.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter_from(0)
    }

    /// The fields from the `first`-th on (all of them past the end: none).
    pub(crate) fn iter_from(&self, first: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .get(first..)
            .unwrap_or_default()
            .iter()
            .map(|&(start, name_end, end)| (&self.buf[start..name_end], &self.buf[name_end..end]))
    }

    /// An empty list with this one's room (the next request's is likely the same size).
    pub(crate) fn with_room_of(&self) -> Self {
        HeaderList {
            buf: Vec::with_capacity(self.buf.capacity()),
            fields: Vec::with_capacity(self.fields.capacity()),
            ..Self::default()
        }
    }

    /// Field `i` as `(name, value)`. Panics if `i >= self.len()`.
    pub(crate) fn get(&self, i: usize) -> (&[u8], &[u8]) {
        let (start, name_end, end) = self.fields[i];
        (&self.buf[start..name_end], &self.buf[name_end..end])
    }

    /// Whether the list went past the `max_list_size` given to [`Decoder::decode`] (RFC 9113
    /// SETTINGS_MAX_HEADER_LIST_SIZE: the sum of each field's name and value lengths plus 32).
    /// Its fields are then incomplete and must not be used.
    pub(crate) fn too_large(&self) -> bool {
        self.too_large
    }

    /// Ends the field whose name and value were just appended to `buf` from `start`, the name
    /// ending at `name_end`: keeps it, or drops it and marks the list too large when the list
    /// goes past `max_list_size`.
    fn finish_field(&mut self, start: usize, name_end: usize, max_list_size: usize) {
        self.size = self
            .size
            .saturating_add(self.buf.len() - start + ENTRY_OVERHEAD);
        // The size only grows: once past the limit, every later field is dropped too.
        if self.size > max_list_size {
            self.too_large = true;
            self.buf.truncate(start);
        } else {
            self.fields.push((start, name_end, self.buf.len()));
        }
    }
}

/// The decoding side of one connection (one dynamic table).
#[derive(Debug)]
pub(crate) struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE this endpoint advertised: the most a table size update
    /// may ask for.
    max_table_size: usize,
}

impl Decoder {
    /// A decoder for a connection on which this endpoint advertised `max_table_size` as its
    /// SETTINGS_HEADER_TABLE_SIZE (4096 unless it sent another value). The dynamic table starts
    /// at that size, as RFC 7541 §4.2 says.
    pub(crate) fn new(max_table_size: usize) -> Self {
        Self {
            table: DynamicTable::new(max_table_size),
            max_table_size,
        }
    }

    /// Decodes one complete header block (a HEADERS frame's fragment and its CONTINUATIONs,
    /// concatenated) into `out`, which is cleared first.
    ///
    /// Past `max_list_size` (see [`HeaderList::too_large`]), decoding goes on to the end of the
    /// block, since the dynamic table must stay in step with the peer's, but the fields are no
    /// longer kept and `out.too_large()` is set. On an error, `out` holds the fields decoded
    /// before it and the decoder must not be used again.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
        out: &mut HeaderList,
    ) -> Result<(), DecodeError> {
        out.clear();
        let mut pos = 0;
        // Table size updates may only come before the first field (RFC 7541 §4.2).
        let mut at_start = true;
        while let Some(&first) = block.get(pos) {
            let start = out.buf.len();
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = read_int(block, &mut pos, 7)?;
                let name_len = self.copy_field(index, &mut out.buf)?;
                let name_end = start + name_len;
                out.finish_field(start, name_end, max_list_size);
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                if !at_start {
                    return Err(DecodeError::LateTableSizeUpdate);
                }
                let size = read_int(block, &mut pos, 5)?;
                if size > self.max_table_size {
                    return Err(DecodeError::TableSizeAboveMaximum);
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // Literal field (§6.2): with incremental indexing (01), without indexing (0000)
                // or never indexed (0001). Its name is indexed unless the index is 0.
                let indexing = first & 0x40 != 0;
                let index = read_int(block, &mut pos, if indexing { 6 } else { 4 })?;
                if index == 0 {
                    read_string(block, &mut pos, &mut out.buf)?;
                } else {
                    self.copy_name(index, &mut out.buf)?;
                }
                let name_end = out.buf.len();
                read_string(block, &mut pos, &mut out.buf)?;
                if indexing {
                    // Inserted from the copy in `out`: the entry its name came from may be
                    // evicted by this very insertion (§4.4).
                    self.table
                        .insert(&out.buf[start..name_end], &out.buf[name_end..]);
                }
                out.finish_field(start, name_end, max_list_size);
            }
            at_start = false;
        }
        Ok(())
    }

    /// Appends the name and value of the field at `index` (static then dynamic table), and
    /// returns the name's length.
    fn copy_field(&self, index: usize, buf: &mut Vec<u8>) -> Result<usize, DecodeError> {
        match index {
            0 => Err(DecodeError::IndexZero),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                buf.extend_from_slice(name);
                buf.extend_from_slice(value);
                Ok(name.len())
            }
            _ => {
                let entry = self
                    .table
                    .get(index - 62)
                    .ok_or(DecodeError::IndexOutOfRange)?;
                self.table
                    .copy(entry.pos, entry.name_len + entry.value_len, buf);
                Ok(entry.name_len)
            }
        }
    }

    /// Appends the name of the field at `index` (static then dynamic table).
    fn copy_name(&self, index: usize, buf: &mut Vec<u8>) -> Result<(), DecodeError> {
        match index {
            0 => Err(DecodeError::IndexZero),
            1..=61 => {
                buf.extend_from_slice(STATIC_TABLE[index - 1].0);
                Ok(())
            }
            _ => {
                let entry = self
                    .table
                    .get(index - 62)
                    .ok_or(DecodeError::IndexOutOfRange)?;
                self.table.copy(entry.pos, entry.name_len, buf);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
impl Decoder {
    /// The dynamic table's entries as `(name, value)`, newest first.
    fn table_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..self.table.entries.len())
            .map(|i| {
                let e = self.table.get(i).unwrap();
                let mut name = Vec::new();
                let mut value = Vec::new();
                self.table.copy(e.pos, e.name_len, &mut name);
                let mut value_pos = e.pos + e.name_len;
                if value_pos >= self.table.ring.len() {
                    value_pos -= self.table.ring.len();
                }
                self.table.copy(value_pos, e.value_len, &mut value);
                (name, value)
            })
            .collect()
    }

    /// The dynamic table's size (RFC 7541 §4.1).
    fn table_size(&self) -> usize {
        self.table.size
    }

    /// The bytes the dynamic table's ring holds room for.
    fn ring_len(&self) -> usize {
        self.table.ring.len()
    }
}

/// One dynamic table entry: its name then value at `pos` in the ring, wrapping at its end.
#[derive(Debug, Clone, Copy)]
struct Entry {
    pos: usize,
    name_len: usize,
    value_len: usize,
}

/// The dynamic table (RFC 7541 §2.3.2, §4): the entries' bytes in one ring buffer, oldest
/// first, and their places in a queue.
///
/// A new entry is written after the newest one, into room that evicting the oldest ones made.
/// The ring starts empty and grows (by powers of two, at least 256 bytes) to hold the entries'
/// bytes, up to `limit`, the advertised maximum table size: every entry counts its bytes plus
/// 32 toward the table size, which never exceeds that maximum, so the bytes always fit. A
/// connection whose client never indexes a field (as idle ones and many clients' are) holds no
/// table at all, where a ring of the full size would cost 4 KiB, and its queue 3 KiB more.
#[derive(Debug)]
struct DynamicTable {
    ring: Box<[u8]>,
    /// The most the ring may grow to.
    limit: usize,
    /// Oldest at the front.
    entries: VecDeque<Entry>,
    /// Where the next entry's bytes go.
    head: usize,
    /// The sum of the entries' sizes (bytes plus 32 each).
    size: usize,
    /// The maximum size, as last set by a table size update.
    max_size: usize,
}

impl DynamicTable {
    fn new(capacity: usize) -> Self {
        Self {
            ring: Box::default(),
            limit: capacity,
            entries: VecDeque::new(),
            head: 0,
            size: 0,
            max_size: capacity,
        }
    }

    /// The entry at dynamic index `i` (0 is the newest).
    fn get(&self, i: usize) -> Option<Entry> {
        let n = self.entries.len();
        if i < n {
            Some(self.entries[n - 1 - i])
        } else {
            None
        }
    }

    /// Appends `len` bytes of the ring from `pos` to `buf`.
    fn copy(&self, pos: usize, len: usize, buf: &mut Vec<u8>) {
        let first = len.min(self.ring.len() - pos);
        buf.extend_from_slice(&self.ring[pos..pos + first]);
        buf.extend_from_slice(&self.ring[..len - first]);
    }

    /// Writes `bytes` into the ring from `self.head`, and moves `head` past them.
    fn write(&mut self, bytes: &[u8]) {
        let cap = self.ring.len();
        let first = bytes.len().min(cap - self.head);
        self.ring[self.head..self.head + first].copy_from_slice(&bytes[..first]);
        self.ring[..bytes.len() - first].copy_from_slice(&bytes[first..]);
        self.head += bytes.len();
        if self.head >= cap {
            self.head -= cap;
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.size -= e.name_len + e.value_len + ENTRY_OVERHEAD;
        }
    }

    /// The entries' bytes, without the 32 each counts toward the table size.
    fn bytes(&self) -> usize {
        self.size - ENTRY_OVERHEAD * self.entries.len()
    }

    /// Moves the entries into a ring of at least `needed` bytes (at most `limit`), oldest first
    /// from its start.
    fn grow(&mut self, needed: usize) {
        let len = needed
            .next_power_of_two()
            .max(256)
            .min(self.limit.max(needed));
        let used = self.bytes();
        let mut ring = vec![0; len].into_boxed_slice();
        if let Some(oldest) = self.entries.front() {
            let first = used.min(self.ring.len() - oldest.pos);
            ring[..first].copy_from_slice(&self.ring[oldest.pos..oldest.pos + first]);
            ring[first..used].copy_from_slice(&self.ring[..used - first]);
        }
        let mut pos = 0;
        for e in &mut self.entries {
            e.pos = pos;
            pos += e.name_len + e.value_len;
        }
        self.ring = ring;
        self.head = used;
    }

    /// Applies a table size update (at most `limit`, which the caller checked).
    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        while self.size > max_size {
            self.evict_oldest();
        }
    }

    /// Adds a field as the newest entry, evicting the oldest ones to make room; an entry larger
    /// than the maximum size empties the table and is not added (§4.4).
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let entry_size = name.len() + value.len() + ENTRY_OVERHEAD;
        if entry_size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        while self.size + entry_size > self.max_size {
            self.evict_oldest();
        }
        let needed = self.bytes() + name.len() + value.len();
        if needed > self.ring.len() {
            self.grow(needed);
        }
        let pos = self.head;
        self.write(name);
        self.write(value);
        self.entries.push_back(Entry {
            pos,
            name_len: name.len(),
            value_len: value.len(),
        });
        self.size += entry_size;
    }
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 §5.1) at `*pos`, which is in `block`,
/// and moves `pos` past it. At most 5 bytes may follow the prefix, enough for any 32-bit value.
fn read_int(block: &[u8], pos: &mut usize, n: u32) -> Result<usize, DecodeError> {
    let max_prefix = (1u8 << n) - 1;
    let prefix = block.get(*pos).ok_or(DecodeError::TruncatedInteger)? & max_prefix;
    *pos += 1;
    if prefix < max_prefix {
        return Ok(usize::from(prefix));
    }
    let mut value = u64::from(max_prefix);
    let mut shift = 0;
    loop {
        let &b = block.get(*pos).ok_or(DecodeError::TruncatedInteger)?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| DecodeError::IntegerOverflow);
        }
        shift += 7;
        if shift > 28 {
            return Err(DecodeError::IntegerOverflow);
        }
    }
}

/// Reads a string literal (RFC 7541 §5.2) at `*pos`, appends it (decoded) to `buf`, and moves
/// `pos` past it.
fn read_string(block: &[u8], pos: &mut usize, buf: &mut Vec<u8>) -> Result<(), DecodeError> {
    let huffman = block.get(*pos).is_some_and(|&b| b & 0x80 != 0);
    let len = read_int(block, pos, 7)?;
    if block.len() - *pos < len {
        return Err(DecodeError::TruncatedString);
    }
    let bytes = &block[*pos..*pos + len];
    *pos += len;
    if huffman {
        huffman::decode(bytes, buf)
    } else {
        buf.extend_from_slice(bytes);
        Ok(())
    }
}

/// Appends `:status` to a response header block: as an indexed field when the static table
/// has it (200, 204, 206, 304, 400, 404, 500), else as a literal without indexing with the
/// static table's name (index 8).
pub(crate) fn encode_status(status: u16, out: &mut Vec<u8>) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(status).as_bytes();
            out.push(0x08);
            write_string(digits, out);
            return;
        }
    };
    out.push(0x80 | index);
}

/// Appends one field to a response header block as a literal without indexing: the name by
/// its static table index when the static table has it, else as a literal lower-cased on the
/// way out (HTTP/2 field names are lower case); the value as a raw string.
///
/// `authorization`, `cookie`, `set-cookie` and `proxy-authorization` go out as never indexed
/// instead, so that intermediaries do not add them to a table either (RFC 7541 §7.1.3).
pub(crate) fn encode_field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match static_name_index(name) {
        Some(index) => {
            let never_indexed = matches!(index, 23 | 32 | 49 | 55);
            write_int(
                usize::from(index),
                4,
                if never_indexed { 0x10 } else { 0x00 },
                out,
            );
        }
        None => {
            out.push(0x00);
            write_int(name.len(), 7, 0x00, out);
            out.extend(name.iter().map(u8::to_ascii_lowercase));
        }
    }
    write_string(value, out);
}

/// Appends `value` with an `n`-bit prefix (RFC 7541 §5.1), the first byte's higher bits set to
/// `flags`.
fn write_int(value: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << n) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Appends a raw (not Huffman-coded) string literal.
fn write_string(bytes: &[u8], out: &mut Vec<u8>) {
    write_int(bytes.len(), 7, 0x00, out);
    out.extend_from_slice(bytes);
}

/// The static table's (lowest) index for the field name `name`, in any case.
fn static_name_index(name: &[u8]) -> Option<u8> {
    if let Some(index) = static_name_index_lower(name) {
        return Some(index);
    }
    // The longest name in the static table has 27 bytes.
    let mut lower = [0u8; 27];
    let lower = lower.get_mut(..name.len())?;
    if !name.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    for (l, &b) in lower.iter_mut().zip(name) {
        *l = b.to_ascii_lowercase();
    }
    static_name_index_lower(lower)
}

/// The static table's (lowest) index for the lower-case field name `name`: by length, then by
/// comparing with the few names of that length.
fn static_name_index_lower(name: &[u8]) -> Option<u8> {
    let index = match name.len() {
        3 => match name {
            b"age" => 21,
            b"via" => 60,
            _ => return None,
        },
        4 => match name {
            b"date" => 33,
            b"etag" => 34,
            b"from" => 37,
            b"host" => 38,
            b"link" => 45,
            b"vary" => 59,
            _ => return None,
        },
        5 => match name {
            b":path" => 4,
            b"allow" => 22,
            b"range" => 50,
            _ => return None,
        },
        6 => match name {
            b"accept" => 19,
            b"cookie" => 32,
            b"expect" => 35,
            b"server" => 54,
            _ => return None,
        },
        7 => match name {
            b":method" => 2,
            b":scheme" => 6,
            b":status" => 8,
            b"expires" => 36,
            b"referer" => 51,
            b"refresh" => 52,
            _ => return None,
        },
        8 => match name {
            b"if-match" => 39,
            b"if-range" => 42,
            b"location" => 46,
            _ => return None,
        },
        10 => match name {
            b":authority" => 1,
            b"set-cookie" => 55,
            b"user-agent" => 58,
            _ => return None,
        },
        11 => match name {
            b"retry-after" => 53,
            _ => return None,
        },
        12 => match name {
            b"content-type" => 31,
            b"max-forwards" => 47,
            _ => return None,
        },
        13 => match name {
            b"accept-ranges" => 18,
            b"authorization" => 23,
            b"cache-control" => 24,
            b"content-range" => 30,
            b"if-none-match" => 41,
            b"last-modified" => 44,
            _ => return None,
        },
        14 => match name {
            b"accept-charset" => 15,
            b"content-length" => 28,
            _ => return None,
        },
        15 => match name {
            b"accept-encoding" => 16,
            b"accept-language" => 17,
            _ => return None,
        },
        16 => match name {
            b"content-encoding" => 26,
            b"content-language" => 27,
            b"content-location" => 29,
            b"www-authenticate" => 61,
            _ => return None,
        },
        17 => match name {
            b"if-modified-since" => 40,
            b"transfer-encoding" => 57,
            _ => return None,
        },
        18 => match name {
            b"proxy-authenticate" => 48,
            _ => return None,
        },
        19 => match name {
            b"content-disposition" => 25,
            b"if-unmodified-since" => 43,
            b"proxy-authorization" => 49,
            _ => return None,
        },
        25 => match name {
            b"strict-transport-security" => 56,
            _ => return None,
        },
        27 => match name {
            b"access-control-allow-origin" => 20,
            _ => return None,
        },
        _ => return None,
    };
    Some(index)
}
