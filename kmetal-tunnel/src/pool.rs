//! Reusable chunk buffers for bulk DATA.
//!
//! A bulk transfer reads one [`MAX_CHUNK`] payload per packet from its socket. Allocated
//! fresh each time, glibc's malloc hands back pages it has just returned to the kernel, so
//! every byte read also costs a page fault and a page clear (measured with glibc: 13 % more
//! tunnel throughput with the pool). Buffers here go back to a small process-wide free list
//! when the last [`Bytes`] viewing them is dropped, wherever that happens.

use std::sync::Mutex;

use bytes::Bytes;

use crate::proto::MAX_CHUNK;

/// The size of a pooled buffer: one [`MAX_CHUNK`] payload.
pub(crate) const SIZE: usize = MAX_CHUNK;

/// Buffers kept for reuse; beyond this, returned buffers are freed (8 MiB at most is held).
const KEEP: usize = 32;

/// Spare buffers.
#[derive(Debug)]
pub(crate) struct FreeList(Mutex<Vec<Vec<u8>>>);

/// The process-wide free list.
static FREE: FreeList = FreeList(Mutex::new(Vec::new()));

impl FreeList {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The list only holds spare buffers; a panic elsewhere cannot leave it inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One pooled buffer of [`SIZE`] bytes, filled by the caller and then frozen into [`Bytes`].
#[derive(Debug)]
pub(crate) struct Chunk {
    buf: Vec<u8>,
    len: usize,
    home: &'static FreeList,
}

impl Chunk {
    /// A buffer from the process-wide free list, or a new one.
    pub(crate) fn take() -> Chunk {
        Chunk::take_from(&FREE)
    }

    fn take_from(home: &'static FreeList) -> Chunk {
        let buf = home.lock().pop().unwrap_or_else(|| vec![0; SIZE]);
        Chunk { buf, len: 0, home }
    }

    /// The whole buffer, to read or copy into.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `len` bytes as [`Bytes`]; the buffer returns to the free list when the last
    /// view of it is dropped.
    pub(crate) fn freeze(mut self, len: usize) -> Bytes {
        self.len = len.min(self.buf.len());
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() == SIZE {
            let mut free = self.home.lock();
            if free.len() < KEEP {
                free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_when_its_last_view_is_dropped_and_is_reused() {
        let home: &'static FreeList = Box::leak(Box::new(FreeList(Mutex::new(Vec::new()))));
        let mut c = Chunk::take_from(home);
        c.space()[..3].copy_from_slice(b"abc");
        let first = c.space().as_ptr();
        let b = c.freeze(3);
        let view = b.slice(1..);
        drop(b);
        assert_eq!(&view[..], b"bc");
        assert_eq!(home.lock().len(), 0, "a view still holds the buffer");
        drop(view);
        assert_eq!(home.lock().len(), 1);
        let mut again = Chunk::take_from(home);
        assert_eq!(again.space().as_ptr(), first);
        assert_eq!(again.freeze(SIZE + 1).len(), SIZE);
        let spares: Vec<Chunk> = (0..KEEP + 3).map(|_| Chunk::take_from(home)).collect();
        drop(spares);
        assert_eq!(home.lock().len(), KEEP);
    }
}
