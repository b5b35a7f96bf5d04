//! Hash: a shard key's partition, computed bit for bit as PostgreSQL's
//! `PARTITION BY HASH` computes it, so the proxy and the server always agree
//! on where a row lives.
//!
//! PostgreSQL (src/backend/partitioning/partbounds.c,
//! `compute_partition_hash_value`) calls each key column's extended hash
//! function with the seed `HASH_PARTITION_SEED`, folds the results with
//! `hash_combine64` (NULL columns are skipped), and takes the remainder by the
//! modulus. The per-type functions (src/backend/utils/adt, access/hash) end in
//! Bob Jenkins' lookup3 with a 64-bit result (src/common/hashfn.c,
//! `hash_bytes_extended` and `hash_bytes_uint32_extended`), which is written
//! out below for little-endian byte order, as every platform Shardline runs
//! on is. Text is hashed as its bytes, which is what PostgreSQL does for
//! deterministic collations (the default); nondeterministic ICU collations
//! are not supported as shard keys.

use crate::shard_map::KeyType;

/// `HASH_PARTITION_SEED` in src/include/catalog/partition.h.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// One shard-key value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Int2(i16),
    Int4(i32),
    Int8(i64),
    /// `text` or `varchar`, as UTF-8 bytes (the server encoding).
    Text(Vec<u8>),
    Uuid([u8; 16]),
}

impl KeyValue {
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyValue::Int2(_) => KeyType::Int2,
            KeyValue::Int4(_) => KeyType::Int4,
            KeyValue::Int8(_) => KeyType::Int8,
            KeyValue::Text(_) => KeyType::Text,
            KeyValue::Uuid(_) => KeyType::Uuid,
        }
    }

    /// The type's extended hash with `seed` (`hashint2extended`,
    /// `hashint4extended`, `hashint8extended`, `hashtextextended`,
    /// `uuid_hash_extended`).
    pub fn hash_extended(&self, seed: u64) -> u64 {
        match self {
            // int2 and int4 hash their value as a (sign-extended) uint32.
            KeyValue::Int2(v) => hash_uint32_extended(*v as i32 as u32, seed),
            KeyValue::Int4(v) => hash_uint32_extended(*v as u32, seed),
            KeyValue::Int8(v) => {
                // Folded so that int8 values in int4 range hash as int4 does.
                let v = *v;
                let lo = v as u32;
                let hi = (v >> 32) as u32;
                let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
                hash_uint32_extended(folded, seed)
            }
            KeyValue::Text(bytes) => hash_bytes_extended(bytes, seed),
            KeyValue::Uuid(bytes) => hash_bytes_extended(bytes, seed),
        }
    }
}

/// `hash_combine64` in src/include/common/hashfn.h.
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// The row hash of a (possibly composite) key; `None` columns are NULL.
pub fn row_hash(key: &[Option<&KeyValue>]) -> u64 {
    key.iter().flatten().fold(0u64, |row, v| {
        hash_combine64(row, v.hash_extended(HASH_PARTITION_SEED))
    })
}

/// The partition (remainder) a key belongs to under `modulus`.
pub fn partition_of(key: &[Option<&KeyValue>], modulus: u32) -> u32 {
    assert!(
        modulus > 0,
        "a hash partitioned table has a positive modulus"
    );
    (row_hash(key) % modulus as u64) as u32
}

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// `hash_bytes_uint32_extended`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = 0x9e37_79b9u32.wrapping_add(4).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    a = a.wrapping_add(k);
    finish(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

fn le32(k: &[u8]) -> u32 {
    u32::from_le_bytes([k[0], k[1], k[2], k[3]])
}

/// `hash_bytes_extended` (lookup3's `hashlittle` with a 64-bit result).
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    // PostgreSQL takes the length as a C int; keys are far below 2 GB.
    let len = k.len() as u32;
    let init = 0x9e37_79b9u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    let mut k = k;
    while k.len() >= 12 {
        a = a.wrapping_add(le32(&k[0..4]));
        b = b.wrapping_add(le32(&k[4..8]));
        c = c.wrapping_add(le32(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 0..=11 bytes, little-endian into a, b and c, zero-padded;
    // c's low byte is left for the length (lookup3's `hashlittle` tail).
    let mut tail = [0u8; 12];
    tail[..k.len()].copy_from_slice(k);
    a = a.wrapping_add(le32(&tail[0..4]));
    b = b.wrapping_add(le32(&tail[4..8]));
    c = c.wrapping_add(le32(&tail[8..12]) << 8);
    finish(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_in_int4_range_hashes_like_int4() {
        for v in [0i32, 1, -1, 42, i32::MIN, i32::MAX] {
            assert_eq!(
                KeyValue::Int8(v as i64).hash_extended(HASH_PARTITION_SEED),
                KeyValue::Int4(v).hash_extended(HASH_PARTITION_SEED),
                "{v}"
            );
            assert_eq!(
                KeyValue::Int2(v as i16).hash_extended(7),
                KeyValue::Int4(v as i16 as i32).hash_extended(7)
            );
        }
    }

    #[test]
    fn null_columns_are_skipped() {
        let v = KeyValue::Int4(5);
        assert_eq!(row_hash(&[None, Some(&v)]), row_hash(&[Some(&v)]));
        assert_eq!(row_hash(&[None]), 0);
        assert_eq!(partition_of(&[None], 8), 0);
    }
}
