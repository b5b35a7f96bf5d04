//! Socket buffers: their size, and keeping what a transaction touches of
//! them on the same few cache lines from one transaction to the next.

use bytes::BytesMut;

/// What a session or server buffer is allocated with, and what an empty
/// one goes back to (see [`rewind`]).
pub const BUFFER_BYTES: usize = 8192;

/// A socket read may fill at least this much of a buffer.
const READ_ROOM_MIN: usize = 4096;

/// Makes room for a socket read: an empty buffer goes back to its front
/// ([`rewind`]); one holding part of a message is re-reserved only when
/// its spare capacity runs low.
#[inline]
pub fn make_room(buf: &mut BytesMut) {
    rewind(buf);
    if buf.capacity() - buf.len() < READ_ROOM_MIN {
        buf.reserve(BUFFER_BYTES);
    }
}

/// Moves an empty buffer back to the front of its allocation. Consuming
/// bytes moves a buffer's start forward, so without this each transaction
/// would read into and write from fresh memory, sweeping kilobytes per
/// buffer through the cache (and the kernel's copies in and out of it
/// would miss too); PgBouncer likewise reuses the same hot buffers. A
/// buffer at its front already has its whole capacity: nothing is looked
/// at then. Never allocates. (Cheap only for a buffer never split: see
/// [`unshared`].)
#[inline]
pub fn rewind(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() < BUFFER_BYTES {
        // An allocation too small to go back to stays where it is.
        let _ = buf.try_reclaim(BUFFER_BYTES);
    }
}

/// `bytes` in a buffer of their own. Splitting frames off a buffer (as
/// logins do) makes its allocation shared, and from then on every
/// reserve, [`rewind`]'s included, looks at the shared header, a cache
/// line of its own; a buffer only appended to and consumed never does.
pub fn unshared(bytes: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(BUFFER_BYTES.max(bytes.len()));
    buf.extend_from_slice(bytes);
    buf
}
