//! HPACK's Huffman code (RFC 7541 §5.2 and Appendix B) and its decoder.
//!
//! [`decode`] turns a Huffman-coded string literal into bytes appended to a buffer, with the
//! checks §5.2 asks for (no EOS symbol, padding of at most 7 bits, all ones). The code is
//! canonical: the codes of one length are consecutive and ordered by symbol, so the tables the
//! decoder uses are derived at compile time from the two arrays of Appendix B below.

use super::DecodeError;

// ---- RFC 7541 Appendix B, generated from the RFC's table (checked against two published copies
// of it, and to be canonical). Data, not code: do not edit by hand. ----

/// Each symbol's code (0..=255, then 256 = EOS), right-aligned in the low `CODE_LENGTHS[sym]` bits.
pub(super) const CODES: [u32; 257] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee, 0x3fffffff,
];

/// Each symbol's code length in bits (5 to 30).
pub(super) const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

// ---- End of the RFC 7541 Appendix B data. ----

/// The end-of-string symbol: a string containing it is an error.
const EOS: u16 = 256;

/// First-level table, indexed by the next 8 bits: `length | symbol << 8` for the codes of at
/// most 8 bits (74 symbols, nearly all of printable ASCII), 0 when those 8 bits start a longer
/// code (they then are `0xfe` or `0xff`).
static SHORT: [u16; 256] = build_short();

/// The longer codes, decoded from the next 32 bits (`top`, left-aligned) as a canonical code.
static LONG: Canonical = build_canonical();

struct Canonical {
    /// `limit[l]`: every left-aligned `top` below it starts with a code of at most `l` bits, and
    /// every `top` at or above it with a longer one. `limit[30]` is 2^32.
    limit: [u64; 31],
    /// `first[l]`: the first (smallest) code of `l` bits.
    first: [u32; 31],
    /// `base[l]`: where the symbols of `l` bits start in `symbols`.
    base: [u16; 31],
    /// The 257 symbols ordered by code length, then by symbol (which is also code order).
    symbols: [u16; 257],
}

const fn build_short() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut sym = 0;
    while sym < 256 {
        let len = CODE_LENGTHS[sym] as usize;
        if len <= 8 {
            // Every byte that starts with this code maps to it.
            let first = (CODES[sym] as usize) << (8 - len);
            let mut k = 0;
            while k < 1 << (8 - len) {
                table[first + k] = len as u16 | (sym as u16) << 8;
                k += 1;
            }
        }
        sym += 1;
    }
    table
}

const fn build_canonical() -> Canonical {
    let mut c = Canonical {
        limit: [0; 31],
        first: [0; 31],
        base: [0; 31],
        symbols: [0; 257],
    };
    let mut n = 0;
    let mut len = 1;
    while len <= 30 {
        c.base[len] = n as u16;
        c.limit[len] = c.limit[len - 1];
        let mut seen = false;
        let mut sym = 0;
        while sym < 257 {
            if CODE_LENGTHS[sym] as usize == len {
                if !seen {
                    c.first[len] = CODES[sym];
                    seen = true;
                }
                c.symbols[n] = sym as u16;
                n += 1;
                let end = (CODES[sym] as u64 + 1) << (32 - len);
                if end > c.limit[len] {
                    c.limit[len] = end;
                }
            }
            sym += 1;
        }
        len += 1;
    }
    c
}

/// Decodes the code at the top of `acc`, of any length: (symbol, length). When the input ends
/// inside it, whatever follows in `acc`, the length is more than the bits left: a code within
/// those bits would be a prefix of it.
#[inline]
fn decode_one(acc: u64) -> (u16, u32) {
    let e = SHORT[(acc >> 56) as usize];
    if e != 0 {
        (e >> 8, u32::from(e & 0xff))
    } else {
        decode_long(acc)
    }
}

/// Decodes a code of more than 8 bits from the top of `acc`: (symbol, length).
#[inline(never)]
#[cold]
fn decode_long(acc: u64) -> (u16, u32) {
    let top = acc >> 32;
    let mut len = 9;
    while top >= LONG.limit[len] {
        len += 1;
    }
    let offset = (top >> (32 - len)) as u32 - LONG.first[len];
    (
        LONG.symbols[usize::from(LONG.base[len]) + offset as usize],
        len as u32,
    )
}

/// How many codes [`decode_group`] decodes: with at least 57 bits in hand, and at most 8 bits
/// per code, seven.
const GROUP: usize = 7;

/// Decodes up to [`GROUP`] codes of at most 8 bits from the top of `acc` into `slots`, one table
/// lookup each and no branch, and returns how many bits they took.
///
/// A longer code has a zero entry, so it and every lookup after it consume nothing (the bytes
/// they write are overwritten or truncated later): the group then took fewer codes, which
/// [`count_short`] counts. The bits taken come from a 1 put below the bits the group can reach,
/// which the shifts move up: its trailing zeros at the end.
#[inline(always)]
fn decode_group(acc: u64, slots: &mut [u8; GROUP]) -> u32 {
    let mut acc = acc | 1;
    for slot in slots {
        let e = SHORT[(acc >> 56) as usize];
        acc <<= e & 63;
        *slot = (e >> 8) as u8;
    }
    acc.trailing_zeros()
}

/// How many codes of at most 8 bits lead `acc`, up to [`GROUP`]: what a group that ended
/// before a longer code took.
#[cold]
fn count_short(mut acc: u64) -> usize {
    let mut n = 0;
    while n < GROUP {
        let e = SHORT[(acc >> 56) as usize];
        if e == 0 {
            break;
        }
        acc <<= e & 0xff;
        n += 1;
    }
    n
}

/// The 64 bits of `src` from bit `bit` (MSB first), where `src` has 8 bytes from that bit's
/// byte: at least the first 57 are the input's.
#[inline]
fn load(src: &[u8], bit: usize) -> u64 {
    u64::from_be_bytes(*src[bit >> 3..].first_chunk::<8>().unwrap()) << (bit & 7)
}

/// Appends the decoding of the Huffman-coded `src` to `out`.
///
/// While eight bytes remain from the next bit's, the fast loop loads the 64 bits from that bit
/// and decodes a group of seven codes from them ([`decode_group`]); a longer code, which stops
/// a group, is then decoded on its own. The last bytes, fewer than eight, go into one
/// accumulator followed by ones, and groups decode them too: at the end the ones make a longer
/// code and stop the group. Then what is left must be padding (or a longer code). The output
/// room is reserved beforehand: a literal of `n` bytes decodes to at most `8n/5` symbols, since
/// no code is shorter than 5 bits.
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    out.resize(start + src.len() * 8 / 5 + 2 * GROUP, 0);
    let mut pos = start;
    // How many bits of `src` were decoded, and the bit below which the next bit's byte has 7
    // more after it.
    let mut bit = 0;
    let fast_end = src.len().saturating_sub(7) * 8;

    while bit < fast_end {
        // Two groups per round while the input allows, to spend the round's checks on more.
        let slots: &mut [u8; 2 * GROUP] = (&mut out[pos..pos + 2 * GROUP]).try_into().unwrap();
        let (first, second) = slots.split_first_chunk_mut::<GROUP>().unwrap();
        let second: &mut [u8; GROUP] = second.try_into().unwrap();
        let mut stopped = false;
        for slots in [first, second] {
            let acc = load(src, bit);
            let taken = decode_group(acc, slots);
            bit += taken as usize;
            if SHORT[((acc << taken) >> 56) as usize] == 0 {
                // A longer code next, maybe after fewer than seven.
                pos += count_short(acc);
                stopped = true;
                break;
            }
            pos += GROUP;
            if bit >= fast_end {
                break;
            }
        }
        if stopped {
            if bit >= fast_end {
                break;
            }
            let (sym, len) = decode_long(load(src, bit));
            if sym == EOS {
                return Err(DecodeError::HuffmanEos);
            }
            out[pos] = sym as u8;
            pos += 1;
            bit += len as usize;
        }
    }

    // Fewer than eight bytes from the next bit's, in one accumulator: their `bits`, then at
    // least 8 ones, then zeros.
    let rest = &src[bit >> 3..];
    let real = rest.len() * 8;
    let word = rest.iter().fold(0u64, |w, &b| w << 8 | u64::from(b));
    let mut acc = (word.unbounded_shl((64 - real) as u32) | u64::MAX >> real) << (bit & 7);
    let mut bits = (real - (bit & 7)) as u32;
    loop {
        let slots: &mut [u8; GROUP] = (&mut out[pos..pos + GROUP]).try_into().unwrap();
        let taken = decode_group(acc, slots);
        if taken > bits {
            // A code took some of the ones: the string does not end on a code and padding;
            // the loop below finds what is wrong.
            break;
        }
        let full = SHORT[((acc << taken) >> 56) as usize] != 0;
        pos += if full { GROUP } else { count_short(acc) };
        acc <<= taken;
        bits -= taken;
        if !full {
            break;
        }
    }
    // Then a longer code or the end, one code at a time.
    loop {
        if bits < 8 && (acc | u64::MAX >> bits) == u64::MAX {
            // At most 7 ones: padding, not a code (none is all ones).
            out.truncate(pos);
            return Ok(());
        }
        let (sym, len) = decode_one(acc);
        if len > bits {
            break;
        }
        if sym == EOS {
            return Err(DecodeError::HuffmanEos);
        }
        out[pos] = sym as u8;
        pos += 1;
        acc <<= len;
        bits -= len;
    }
    // Padding is a strict prefix of EOS: at most 7 bits, all ones.
    Err(if bits > 7 {
        DecodeError::HuffmanPaddingTooLong
    } else {
        DecodeError::HuffmanPaddingNotOnes
    })
}
