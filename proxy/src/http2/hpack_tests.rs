//! Tests of the HPACK decoder and encoder: the examples of RFC 7541 Appendix C, every decoding
//! error from a crafted block, the header list size limit, and properties over random input
//! (encoded lists decode back, Huffman-coded strings decode back, no input panics the decoder,
//! and the dynamic table matches a simple model).

use std::collections::VecDeque;

use proptest::prelude::*;

use super::huffman::{CODE_LENGTHS, CODES};
use super::{
    DecodeError, Decoder, HeaderList, STATIC_TABLE, encode_field, encode_status, huffman,
    static_name_index, write_int, write_string,
};

type Fields = Vec<(String, String)>;

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn fields(list: &HeaderList) -> Fields {
    list.iter().map(|(n, v)| (text(n), text(v))).collect()
}

fn table(decoder: &Decoder) -> Fields {
    decoder
        .table_entries()
        .iter()
        .map(|(n, v)| (text(n), text(v)))
        .collect()
}

fn owned(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|&(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}

/// Decodes `hex` with no list size limit and checks the fields, then the dynamic table (newest
/// first) and its size.
fn step(
    decoder: &mut Decoder,
    hex: &str,
    want_fields: &[(&str, &str)],
    want_table: &[(&str, &str)],
    want_size: usize,
) {
    let mut out = HeaderList::new();
    decoder.decode(&unhex(hex), usize::MAX, &mut out).unwrap();
    assert!(!out.too_large());
    assert_eq!(fields(&out), owned(want_fields), "fields of {hex}");
    assert_eq!(out.len(), want_fields.len());
    assert_eq!(table(decoder), owned(want_table), "table after {hex}");
    assert_eq!(decoder.table_size(), want_size, "table size after {hex}");
}

/// A test-only Huffman encoder: `symbols` (256 is EOS) coded and padded with ones.
fn huffman_encode(symbols: impl IntoIterator<Item = u16>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u64;
    let mut bits = 0u32;
    for sym in symbols {
        let len = u32::from(CODE_LENGTHS[usize::from(sym)]);
        acc = (acc << len) | u64::from(CODES[usize::from(sym)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

/// A test-only Huffman decoder, one bit at a time, straight from RFC 7541 §5.2.
fn reference_huffman_decode(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let (mut code, mut len) = (0u32, 0u8);
    for i in 0..src.len() * 8 {
        code = code << 1 | u32::from(src[i / 8] >> (7 - i % 8) & 1);
        len += 1;
        if let Some(sym) = (0..257).find(|&s| CODE_LENGTHS[s] == len && CODES[s] == code) {
            if sym == 256 {
                return Err(DecodeError::HuffmanEos);
            }
            out.push(sym as u8);
            (code, len) = (0, 0);
        }
    }
    if len > 7 {
        Err(DecodeError::HuffmanPaddingTooLong)
    } else if code != (1 << len) - 1 {
        Err(DecodeError::HuffmanPaddingNotOnes)
    } else {
        Ok(out)
    }
}

fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
    // Something in front, as in a header list's buffer.
    let mut out = b"prefix".to_vec();
    huffman::decode(src, &mut out)?;
    Ok(out.split_off(6))
}

/// A literal field with incremental indexing and a literal name, which the encoder under test
/// never writes.
fn literal_indexed(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x40);
    write_string(name, out);
    write_string(value, out);
}

/// A Huffman-coded string literal.
fn huffman_string(bytes: &[u8], out: &mut Vec<u8>) {
    let coded = huffman_encode(bytes.iter().map(|&b| u16::from(b)));
    write_int(coded.len(), 7, 0x80, out);
    out.extend_from_slice(&coded);
}

// ---- RFC 7541 Appendix C ----

#[test]
fn rfc7541_c2_field_representations() {
    // C.2.1: literal with indexing.
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
        &[("custom-key", "custom-header")],
        &[("custom-key", "custom-header")],
        55,
    );
    // C.2.2: literal without indexing.
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "040c 2f73 616d 706c 652f 7061 7468",
        &[(":path", "/sample/path")],
        &[],
        0,
    );
    // C.2.3: literal never indexed.
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "1008 7061 7373 776f 7264 0673 6563 7265 74",
        &[("password", "secret")],
        &[],
        0,
    );
    // C.2.4: indexed.
    let mut d = Decoder::new(4096);
    step(&mut d, "82", &[(":method", "GET")], &[], 0);
}

const C3_FIELDS_1: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
];
const C3_FIELDS_2: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
    ("cache-control", "no-cache"),
];
const C3_FIELDS_3: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
];
const C3_TABLE_1: &[(&str, &str)] = &[(":authority", "www.example.com")];
const C3_TABLE_2: &[(&str, &str)] = &[
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];
const C3_TABLE_3: &[(&str, &str)] = &[
    ("custom-key", "custom-value"),
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];

#[test]
fn rfc7541_c3_requests_without_huffman() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        C3_FIELDS_1,
        C3_TABLE_1,
        57,
    );
    step(
        &mut d,
        "8286 84be 5808 6e6f 2d63 6163 6865",
        C3_FIELDS_2,
        C3_TABLE_2,
        110,
    );
    step(
        &mut d,
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        C3_FIELDS_3,
        C3_TABLE_3,
        164,
    );
}

#[test]
fn rfc7541_c4_requests_with_huffman() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        C3_FIELDS_1,
        C3_TABLE_1,
        57,
    );
    step(
        &mut d,
        "8286 84be 5886 a8eb 1064 9cbf",
        C3_FIELDS_2,
        C3_TABLE_2,
        110,
    );
    step(
        &mut d,
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        C3_FIELDS_3,
        C3_TABLE_3,
        164,
    );
}

const C5_FIELDS_1: &[(&str, &str)] = &[
    (":status", "302"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const C5_TABLE_1: &[(&str, &str)] = &[
    ("location", "https://www.example.com"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("cache-control", "private"),
    (":status", "302"),
];
const C5_FIELDS_2: &[(&str, &str)] = &[
    (":status", "307"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("location", "https://www.example.com"),
];
const C5_TABLE_2: &[(&str, &str)] = &[
    (":status", "307"),
    ("location", "https://www.example.com"),
    ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
    ("cache-control", "private"),
];
const C5_FIELDS_3: &[(&str, &str)] = &[
    (":status", "200"),
    ("cache-control", "private"),
    ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ("location", "https://www.example.com"),
    ("content-encoding", "gzip"),
    (
        "set-cookie",
        "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
    ),
];
const C5_TABLE_3: &[(&str, &str)] = &[
    (
        "set-cookie",
        "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
    ),
    ("content-encoding", "gzip"),
    ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
];

#[test]
fn rfc7541_c5_responses_without_huffman() {
    let mut d = Decoder::new(256);
    step(
        &mut d,
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
         2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
         6c65 2e63 6f6d",
        C5_FIELDS_1,
        C5_TABLE_1,
        222,
    );
    step(&mut d, "4803 3330 37c1 c0bf", C5_FIELDS_2, C5_TABLE_2, 222);
    step(
        &mut d,
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
         54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
         5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
         3d31",
        C5_FIELDS_3,
        C5_TABLE_3,
        215,
    );
}

#[test]
fn rfc7541_c6_responses_with_huffman() {
    let mut d = Decoder::new(256);
    step(
        &mut d,
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        C5_FIELDS_1,
        C5_TABLE_1,
        222,
    );
    step(&mut d, "4883 640e ffc1 c0bf", C5_FIELDS_2, C5_TABLE_2, 222);
    step(
        &mut d,
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
         9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        C5_FIELDS_3,
        C5_TABLE_3,
        215,
    );
}

// ---- Errors ----

/// A Huffman-coded literal value whose coded bytes are `coded` (literal name "a").
fn with_huffman_value(coded: &[u8]) -> Vec<u8> {
    let mut block = vec![0x00, 0x01, b'a'];
    write_int(coded.len(), 7, 0x80, &mut block);
    block.extend_from_slice(coded);
    block
}

#[test]
fn every_error_from_a_crafted_block() {
    let a = u16::from(b'a');
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "integer ends with the block",
            vec![0xff],
            DecodeError::TruncatedInteger,
        ),
        (
            "integer continues past the block",
            vec![0xff, 0x80],
            DecodeError::TruncatedInteger,
        ),
        (
            "string length missing",
            vec![0x40],
            DecodeError::TruncatedInteger,
        ),
        (
            "six bytes after the prefix",
            vec![0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            DecodeError::IntegerOverflow,
        ),
        (
            "name past the block",
            vec![0x40, 0x05, b'a'],
            DecodeError::TruncatedString,
        ),
        (
            "value past the block",
            vec![0x04, 0x02, b'/'],
            DecodeError::TruncatedString,
        ),
        ("indexed field 0", vec![0x80], DecodeError::IndexZero),
        (
            "indexed field 62 in an empty table",
            vec![0xbe],
            DecodeError::IndexOutOfRange,
        ),
        (
            "indexed name 62 in an empty table",
            vec![0x7e, 0x00],
            DecodeError::IndexOutOfRange,
        ),
        (
            "never-indexed name 62",
            vec![0x1f, 0x2f, 0x00],
            DecodeError::IndexOutOfRange,
        ),
        (
            "five bytes after the prefix: a large index",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
            DecodeError::IndexOutOfRange,
        ),
        (
            "table size 4097",
            vec![0x3f, 0xe2, 0x1f],
            DecodeError::TableSizeAboveMaximum,
        ),
        (
            "table size update after a field",
            vec![0x82, 0x20],
            DecodeError::LateTableSizeUpdate,
        ),
        (
            "table size update after a literal",
            vec![0x04, 0x01, b'/', 0x20],
            DecodeError::LateTableSizeUpdate,
        ),
        (
            "eos alone",
            with_huffman_value(&[0xff, 0xff, 0xff, 0xff]),
            DecodeError::HuffmanEos,
        ),
        (
            "eos amid a long string (fast loop)",
            with_huffman_value(&huffman_encode(
                std::iter::repeat_n(a, 20)
                    .chain([256])
                    .chain(std::iter::repeat_n(a, 20)),
            )),
            DecodeError::HuffmanEos,
        ),
        (
            "eos near the end (tail loop)",
            with_huffman_value(&huffman_encode([a, 256, a])),
            DecodeError::HuffmanEos,
        ),
        (
            "8 bits of padding",
            with_huffman_value(&[0xff]),
            DecodeError::HuffmanPaddingTooLong,
        ),
        (
            "'a' then 11 bits of ones",
            with_huffman_value(&[0x1f, 0xff]),
            DecodeError::HuffmanPaddingTooLong,
        ),
        // 'a' is 00011: the 3 bits after it are padding.
        (
            "padding of zeros",
            with_huffman_value(&[0x18]),
            DecodeError::HuffmanPaddingNotOnes,
        ),
        (
            "padding that starts a code",
            with_huffman_value(&[0x1e]),
            DecodeError::HuffmanPaddingNotOnes,
        ),
    ];
    for (what, block, want) in cases {
        let mut out = HeaderList::new();
        let got = Decoder::new(4096).decode(&block, usize::MAX, &mut out);
        assert_eq!(got, Err(want), "{what}: {block:02x?}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn error_messages_are_lowercase_without_period() {
    for e in [
        DecodeError::TruncatedInteger,
        DecodeError::IntegerOverflow,
        DecodeError::TruncatedString,
        DecodeError::IndexZero,
        DecodeError::IndexOutOfRange,
        DecodeError::TableSizeAboveMaximum,
        DecodeError::LateTableSizeUpdate,
        DecodeError::HuffmanEos,
        DecodeError::HuffmanPaddingTooLong,
        DecodeError::HuffmanPaddingNotOnes,
    ] {
        let message = e.to_string();
        assert_eq!(message, message.to_lowercase(), "{e:?}");
        assert!(!message.ends_with('.'), "{e:?}");
    }
}

#[test]
fn limits_that_are_not_errors() {
    let mut out = HeaderList::new();
    // Five bytes after the prefix: 4096 exactly as a table size, then an update to 0 and back.
    let mut d = Decoder::new(4096);
    d.decode(
        &[0x3f, 0xe1, 0x1f, 0x20, 0x3f, 0xe1, 0x1f, 0x82],
        usize::MAX,
        &mut out,
    )
    .unwrap();
    assert_eq!(fields(&out), owned(&[(":method", "GET")]));
    // An empty block, and empty Huffman strings.
    d.decode(&[], usize::MAX, &mut out).unwrap();
    assert!(out.is_empty());
    d.decode(&[0x00, 0x80, 0x80], usize::MAX, &mut out).unwrap();
    assert_eq!(fields(&out), owned(&[("", "")]));
    // Seven bits of padding.
    d.decode(&with_huffman_value(&[0x1f]), usize::MAX, &mut out)
        .unwrap();
    assert_eq!(fields(&out), owned(&[("a", "a")]));
}

// ---- Dynamic table ----

#[test]
fn table_size_updates_evict() {
    let mut d = Decoder::new(4096);
    let mut out = HeaderList::new();
    let mut block = Vec::new();
    literal_indexed(b"one", b"1", &mut block);
    literal_indexed(b"two", b"2", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(d.table_size(), 72);
    // Down to 36 (room for "two" only), then a field.
    let mut block = Vec::new();
    write_int(36, 5, 0x20, &mut block);
    block.push(0xbe);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(fields(&out), owned(&[("two", "2")]));
    assert_eq!(table(&d), owned(&[("two", "2")]));
    // Now at most 36: a new entry evicts "two"; one larger than 36 empties the table.
    let mut block = Vec::new();
    literal_indexed(b"six", b"6", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(table(&d), owned(&[("six", "6")]));
    let mut block = Vec::new();
    literal_indexed(b"seven", b"7", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(fields(&out), owned(&[("seven", "7")]));
    assert_eq!(table(&d), owned(&[]));
    assert_eq!(d.table_size(), 0);
    // To 0 then back up to 4096, in one block.
    d.decode(&[0x20, 0x3f, 0xe1, 0x1f], usize::MAX, &mut out)
        .unwrap();
    let mut block = Vec::new();
    literal_indexed(b"eight", b"8", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(table(&d), owned(&[("eight", "8")]));
}

#[test]
fn new_entry_named_after_the_entry_it_evicts() {
    // RFC 7541 §4.4: the name must survive the eviction of the entry it refers to.
    let mut d = Decoder::new(100);
    let mut out = HeaderList::new();
    let mut block = Vec::new();
    literal_indexed(b"a-rather-long-name", b"first", &mut block);
    // Literal with incremental indexing, name = dynamic index 62 (the entry above).
    write_int(62, 6, 0x40, &mut block);
    write_string(b"second value", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    let want = [
        ("a-rather-long-name", "first"),
        ("a-rather-long-name", "second value"),
    ];
    assert_eq!(fields(&out), owned(&want));
    assert_eq!(table(&d), owned(&want[1..]));
}

#[test]
fn zero_size_table() {
    let mut d = Decoder::new(0);
    let mut out = HeaderList::new();
    let mut block = vec![0x20];
    literal_indexed(b"k", b"v", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(fields(&out), owned(&[("k", "v")]));
    assert_eq!(
        d.decode(&[0xbe], usize::MAX, &mut out),
        Err(DecodeError::IndexOutOfRange)
    );
    assert_eq!(
        Decoder::new(0).decode(&[0x21], 0, &mut out),
        Err(DecodeError::TableSizeAboveMaximum)
    );
}

// ---- Header list size ----

#[test]
fn too_large_list_is_flagged_and_the_table_kept_in_step() {
    let mut d = Decoder::new(4096);
    let mut out = HeaderList::new();
    let mut block = vec![0x82]; // :method GET: 7 + 3 + 32 = 42
    literal_indexed(b"x-one", b"1", &mut block); // 38
    literal_indexed(b"x-two", b"22", &mut block); // 39
    block.push(0x84); // :path /: 5 + 1 + 32 = 38

    // Exactly at the limit is fine.
    d.decode(&block, 42 + 38 + 39 + 38, &mut out).unwrap();
    assert!(!out.too_large());
    assert_eq!(out.len(), 4);

    let mut d = Decoder::new(4096);
    d.decode(&block, 42 + 38 + 39 + 37, &mut out).unwrap();
    assert!(out.too_large());
    assert_eq!(out.len(), 3, "the fields before the limit stay");
    assert_eq!(table(&d), owned(&[("x-two", "22"), ("x-one", "1")]));

    let mut d = Decoder::new(4096);
    d.decode(&block, 50, &mut out).unwrap();
    assert!(out.too_large());
    assert_eq!(fields(&out), owned(&[(":method", "GET")]));
    // Both insertions happened although neither field was kept.
    assert_eq!(table(&d), owned(&[("x-two", "22"), ("x-one", "1")]));
    // The next block refers to them and decodes, with its own limit.
    d.decode(&[0xbe, 0xbf], 1000, &mut out).unwrap();
    assert!(!out.too_large());
    assert_eq!(fields(&out), owned(&[("x-two", "22"), ("x-one", "1")]));
    // A limit of 0 flags any field; an empty block is never too large.
    d.decode(&[0x82], 0, &mut out).unwrap();
    assert!(out.too_large() && out.is_empty());
    d.decode(&[], 0, &mut out).unwrap();
    assert!(!out.too_large());
}

// ---- Huffman ----

#[test]
fn huffman_every_symbol() {
    for sym in 0..=255u8 {
        let coded = huffman_encode([u16::from(sym)]);
        assert_eq!(huffman_decode(&coded), Ok(vec![sym]), "symbol {sym}");
        // And at every offset from the start of the fast loop.
        for before in 0..12 {
            let mut plain = vec![b'e'; before];
            plain.push(sym);
            plain.extend_from_slice(b"0123456789abc");
            let coded = huffman_encode(plain.iter().map(|&b| u16::from(b)));
            assert_eq!(
                huffman_decode(&coded),
                Ok(plain),
                "symbol {sym} after {before}"
            );
        }
    }
    let all: Vec<u8> = (0..=255).collect();
    let coded = huffman_encode(all.iter().map(|&b| u16::from(b)));
    assert_eq!(huffman_decode(&coded), Ok(all));
}

#[test]
fn huffman_decodes_the_rfc_strings() {
    assert_eq!(
        huffman_decode(&unhex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")),
        Ok(b"www.example.com".to_vec())
    );
    assert_eq!(
        huffman_decode(&unhex("a8eb 1064 9cbf")),
        Ok(b"no-cache".to_vec())
    );
    assert_eq!(
        huffman_decode(&unhex("25a8 49e9 5ba9 7d7f")),
        Ok(b"custom-key".to_vec())
    );
    assert_eq!(
        huffman_decode(&unhex("25a8 49e9 5bb8 e8b4 bf")),
        Ok(b"custom-value".to_vec())
    );
    assert_eq!(huffman_decode(&[]), Ok(Vec::new()));
}

// ---- Encoder ----

#[test]
fn encode_status_indexed_or_literal() {
    for (status, index) in [
        (200, 8),
        (204, 9),
        (206, 10),
        (304, 11),
        (400, 12),
        (404, 13),
        (500, 14),
    ] {
        let mut out = Vec::new();
        encode_status(status, &mut out);
        assert_eq!(out, [0x80 | index], "{status}");
    }
    let mut out = Vec::new();
    encode_status(302, &mut out);
    assert_eq!(out, b"\x08\x03302");
}

#[test]
fn encode_field_representations() {
    let cases: &[(&[u8], &[u8], &[u8])] = &[
        // Static name, index < 15: one byte.
        (b"date", b"x", b"\x0f\x12\x01x"),
        (b":path", b"/", b"\x04\x01/"),
        // Index 31 = 15 + 16; mixed case matches too.
        (b"content-type", b"a", b"\x0f\x10\x01a"),
        (b"Content-Type", b"a", b"\x0f\x10\x01a"),
        // Never indexed.
        (b"authorization", b"t", b"\x1f\x08\x01t"),
        (b"Cookie", b"c", b"\x1f\x11\x01c"),
        (b"set-cookie", b"c", b"\x1f\x28\x01c"),
        (b"proxy-authorization", b"p", b"\x1f\x22\x01p"),
        // Literal name, lower-cased.
        (b"X-Request-Id", b"7", b"\x00\x0cx-request-id\x017"),
        (b"", b"", b"\x00\x00\x00"),
    ];
    for &(name, value, want) in cases {
        let mut out = Vec::new();
        encode_field(name, value, &mut out);
        assert_eq!(out, want, "{}", String::from_utf8_lossy(name));
    }
}

#[test]
fn static_name_index_matches_the_static_table() {
    for &(name, _) in &STATIC_TABLE {
        let lowest = STATIC_TABLE.iter().position(|&(n, _)| n == name).unwrap() + 1;
        assert_eq!(
            static_name_index(name),
            Some(lowest as u8),
            "{}",
            text(name)
        );
        let upper = name.to_ascii_uppercase();
        assert_eq!(
            static_name_index(&upper),
            Some(lowest as u8),
            "{}",
            text(&upper)
        );
    }
    for name in [
        &b"x-custom"[..],
        b"dates",
        b"Dat",
        b"",
        b"ACCESS-CONTROL-ALLOW-ORIGINS",
        b"content_type",
    ] {
        assert_eq!(static_name_index(name), None, "{}", text(name));
    }
}

// ---- Properties ----

/// A field name: one of the static table's, in some case, or a token.
fn field_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0..STATIC_TABLE.len(), any::<u64>()).prop_map(|(i, case)| {
            STATIC_TABLE[i]
                .0
                .iter()
                .enumerate()
                .map(|(k, &b)| {
                    if case >> (k % 64) & 1 == 1 {
                        b.to_ascii_uppercase()
                    } else {
                        b
                    }
                })
                .collect()
        }),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,40}".prop_map(String::into_bytes),
    ]
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "[ -~]{0,300}".prop_map(String::into_bytes),
    ]
}

/// Each field of `list` as a literal with incremental indexing, Huffman-coded or not.
fn indexed_block(list: &[(Vec<u8>, Vec<u8>, bool)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value, huffman) in list {
        if *huffman {
            block.push(0x40);
            huffman_string(name, &mut block);
            huffman_string(value, &mut block);
        } else {
            literal_indexed(name, value, &mut block);
        }
    }
    block
}

/// The dynamic table as RFC 7541 §4 describes it, newest first.
#[derive(Default)]
struct ModelTable {
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    max: usize,
}

impl ModelTable {
    fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(n, v)| n.len() + v.len() + 32)
            .sum()
    }

    fn shrink(&mut self) {
        while self.size() > self.max {
            self.entries.pop_back();
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        self.entries.push_front((name.to_vec(), value.to_vec()));
        self.shrink();
    }
}

#[derive(Debug, Clone)]
enum TableOp {
    Insert(Vec<u8>, Vec<u8>),
    /// Insert with the name of dynamic entry `i % len`.
    InsertNamedAfter(usize, Vec<u8>),
    Resize(usize),
    Lookup(usize),
}

fn table_op() -> impl Strategy<Value = TableOp> {
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    prop_oneof![
        4 => (bytes(40), bytes(120)).prop_map(|(n, v)| TableOp::Insert(n, v)),
        2 => (any::<usize>(), bytes(60)).prop_map(|(i, v)| TableOp::InsertNamedAfter(i, v)),
        1 => (0..=300usize).prop_map(TableOp::Resize),
        2 => any::<usize>().prop_map(TableOp::Lookup),
    ]
}

proptest! {
    #[test]
    fn encoded_lists_decode_back(
        status in 100..=999u16,
        list in proptest::collection::vec((field_name(), field_value()), 0..20),
    ) {
        let mut block = Vec::new();
        encode_status(status, &mut block);
        for (name, value) in &list {
            encode_field(name, value, &mut block);
        }
        let mut d = Decoder::new(4096);
        let mut out = HeaderList::new();
        d.decode(&block, usize::MAX, &mut out).unwrap();
        let mut want = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        want.extend(list.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())));
        let got: Vec<(Vec<u8>, Vec<u8>)> = out.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(got, want);
        for i in 0..out.len() {
            prop_assert_eq!(out.get(i), out.iter().nth(i).unwrap());
        }
        // The encoder never adds to the table.
        prop_assert_eq!(d.table_size(), 0);
    }

    #[test]
    fn huffman_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..300)) {
        let coded = huffman_encode(plain.iter().map(|&b| u16::from(b)));
        prop_assert_eq!(huffman_decode(&coded), Ok(plain));
    }

    #[test]
    fn huffman_round_trip_ascii(plain in "[ -~]{0,300}") {
        let coded = huffman_encode(plain.bytes().map(u16::from));
        prop_assert_eq!(huffman_decode(&coded), Ok(plain.into_bytes()));
    }

    #[test]
    fn huffman_matches_the_reference_on_any_bytes(
        src in proptest::collection::vec(
            prop_oneof![any::<u8>(), Just(0xff), Just(0xfe), Just(0x00)],
            0..80,
        ),
        tail in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        prop_assert_eq!(huffman_decode(&src), reference_huffman_decode(&src));
        // And valid strings with a few random bytes after them.
        let mut src = huffman_encode(src.iter().map(|&b| u16::from(b)));
        src.extend_from_slice(&tail);
        prop_assert_eq!(huffman_decode(&src), reference_huffman_decode(&src));
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        block in proptest::collection::vec(any::<u8>(), 0..400),
        max_table_size in 0..5000usize,
        max_list_size in 0..5000usize,
    ) {
        let mut d = Decoder::new(max_table_size);
        let mut out = HeaderList::new();
        if d.decode(&block, max_list_size, &mut out).is_ok() {
            prop_assert!(d.table_size() <= max_table_size);
            prop_assert_eq!(out.iter().count(), out.len());
            if !out.too_large() {
                let size: usize = out.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                prop_assert!(size <= max_list_size);
            }
        }
        // Also whatever follows a valid prefix, and Huffman strings of random bytes.
        let mut prefixed = unhex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        prefixed.extend_from_slice(&block);
        let _ = Decoder::new(max_table_size).decode(&prefixed, max_list_size, &mut out);
        let _ = huffman_decode(&block);
    }

    #[test]
    fn too_large_list_keeps_the_table_in_step(
        list in proptest::collection::vec(
            ("[a-z-]{1,20}".prop_map(String::into_bytes),
             proptest::collection::vec(any::<u8>(), 0..40),
             any::<bool>()),
            1..20,
        ),
        max_list_size in 0..2000usize,
    ) {
        // At most 20 fields of at most 92 bytes each: nothing is evicted from 4096.
        let mut d = Decoder::new(4096);
        let mut out = HeaderList::new();
        d.decode(&indexed_block(&list), max_list_size, &mut out).unwrap();
        let size: usize = list.iter().map(|(n, v, _)| n.len() + v.len() + 32).sum();
        prop_assert_eq!(out.too_large(), size > max_list_size);
        let kept: Vec<(Vec<u8>, Vec<u8>)> = out.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let sent: Vec<(Vec<u8>, Vec<u8>)> = list.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect();
        prop_assert_eq!(&kept[..], &sent[..kept.len()]);
        if !out.too_large() {
            prop_assert_eq!(kept.len(), sent.len());
        }
        // The next block refers to every entry, newest first.
        let mut block = Vec::new();
        for i in 0..list.len() {
            write_int(62 + i, 7, 0x80, &mut block);
        }
        d.decode(&block, usize::MAX, &mut out).unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> = out.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let mut newest_first = sent;
        newest_first.reverse();
        prop_assert_eq!(got, newest_first);
    }

    #[test]
    fn dynamic_table_matches_a_model(
        max_table_size in 0..300usize,
        ops in proptest::collection::vec(table_op(), 0..60),
    ) {
        let mut d = Decoder::new(max_table_size);
        let mut model = ModelTable { entries: VecDeque::new(), max: max_table_size };
        let mut out = HeaderList::new();
        for op in ops {
            let mut block = Vec::new();
            match op {
                TableOp::Insert(name, value) => {
                    literal_indexed(&name, &value, &mut block);
                    d.decode(&block, usize::MAX, &mut out).unwrap();
                    prop_assert_eq!(out.get(0), (&name[..], &value[..]));
                    model.insert(&name, &value);
                }
                TableOp::InsertNamedAfter(i, value) => {
                    if model.entries.is_empty() {
                        continue;
                    }
                    let i = i % model.entries.len();
                    let name = model.entries[i].0.clone();
                    write_int(62 + i, 6, 0x40, &mut block);
                    huffman_string(&value, &mut block);
                    d.decode(&block, usize::MAX, &mut out).unwrap();
                    prop_assert_eq!(out.get(0), (&name[..], &value[..]));
                    model.insert(&name, &value);
                }
                TableOp::Resize(size) => {
                    write_int(size, 5, 0x20, &mut block);
                    let got = d.decode(&block, usize::MAX, &mut out);
                    if size > max_table_size {
                        prop_assert_eq!(got, Err(DecodeError::TableSizeAboveMaximum));
                        return Ok(());
                    }
                    got.unwrap();
                    model.max = size;
                    model.shrink();
                }
                TableOp::Lookup(i) => {
                    let n = model.entries.len();
                    let i = if n == 0 { 0 } else { i % (n + 1) };
                    write_int(62 + i, 7, 0x80, &mut block);
                    let got = d.decode(&block, usize::MAX, &mut out);
                    if i < n {
                        got.unwrap();
                        let (name, value) = &model.entries[i];
                        prop_assert_eq!(out.get(0), (&name[..], &value[..]));
                    } else {
                        prop_assert_eq!(got, Err(DecodeError::IndexOutOfRange));
                        return Ok(());
                    }
                }
            }
            let want: Vec<(Vec<u8>, Vec<u8>)> = model.entries.iter().cloned().collect();
            prop_assert_eq!(d.table_entries(), want);
            prop_assert_eq!(d.table_size(), model.size());
        }
    }
}

/// The ring holds what the entries need, not the advertised maximum: nothing for a client that
/// never indexes a field, a little for one that indexes a few, the maximum only once it is used.
#[test]
fn the_table_takes_room_as_entries_need_it() {
    let mut d = Decoder::new(4096);
    let mut out = HeaderList::new();
    let mut plain = Vec::new();
    encode_field(b"user-agent", b"not indexed", &mut plain);
    d.decode(&plain, usize::MAX, &mut out).unwrap();
    assert_eq!(d.ring_len(), 0, "a field never indexed took table room");

    let mut block = Vec::new();
    literal_indexed(b"user-agent", b"a client/1.0", &mut block);
    d.decode(&block, usize::MAX, &mut out).unwrap();
    assert_eq!(d.ring_len(), 256);

    // Entries past 256 bytes in all, wrapping and evicting as the table fills and turns over:
    // the ring grows to the maximum and no further, and every entry still reads back.
    for i in 0..200 {
        let mut block = Vec::new();
        let value = format!("value {i} {}", "x".repeat(i % 90));
        literal_indexed(format!("name-{i}").as_bytes(), value.as_bytes(), &mut block);
        d.decode(&block, usize::MAX, &mut out).unwrap();
        assert!(d.ring_len() <= 4096);
        let newest = &d.table_entries()[0];
        assert_eq!(newest.1, value.as_bytes());
    }
    assert_eq!(d.ring_len(), 4096);
    assert!(d.table_size() <= 4096);
}

/// A released list holds nothing, and takes its old room back at once when next filled.
#[test]
fn a_released_list_takes_its_room_back_when_filled() {
    let mut d = Decoder::new(4096);
    let mut list = HeaderList::new();
    let mut block = Vec::new();
    for i in 0..20 {
        encode_field(
            format!("x-field-{i}").as_bytes(),
            b"a value of some length",
            &mut block,
        );
    }
    d.decode(&block, usize::MAX, &mut list).unwrap();
    let room = (list.buf.capacity(), list.fields.capacity());
    list.release();
    assert_eq!((list.buf.capacity(), list.fields.capacity()), (0, 0));
    assert!(list.is_empty());

    let mut one = Vec::new();
    encode_field(b"x-one", b"1", &mut one);
    d.decode(&one, usize::MAX, &mut list).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list.get(0), (&b"x-one"[..], &b"1"[..]));
    assert!(list.buf.capacity() >= room.0 && list.fields.capacity() >= room.1);
}
