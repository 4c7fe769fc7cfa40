//! The receive low-water mark (`SO_RCVLOWAT`): fewer wake-ups while a large
//! IMAP literal streams in.
//!
//! # Why
//!
//! Dovecot (OpenSSL) writes TLS records of about 8 KiB at a pace the proxy
//! outruns, so without help the kernel wakes the proxy for every record or
//! two: per GB of FETCH 121,000–263,000 `recvfrom` and 62,000–143,000
//! `epoll_wait` (docs/benchmarks.md, issue 15). Reading ahead cannot help
//! when only one record is there. While the IMAP filter is inside a literal
//! it knows how many bytes the server must still send, and the kernel can be
//! told not to report the socket readable before that many (at most
//! [`MOST`]) are queued: one wake-up per batch, with no timer.
//!
//! # Why it never stalls a session
//!
//! The mark is only ever a number of bytes that the server is certain to
//! send on the socket without waiting for anything from the proxy, so the
//! queue reaches it unless the server stops mid-literal, in which case the
//! client waits for those bytes anyway. The count is built downwards:
//!
//! - the filter counts the literal's bytes it has not seen yet
//!   ([`crate::relay::Filter::upstream_owes`]); a server never waits for the
//!   client in the middle of a response;
//! - some of them may already have left the kernel and sit between the socket
//!   and the filter: the read-ahead buffer under rustls (counted exactly) and
//!   rustls itself, which reads the socket only when it holds no plaintext,
//!   into a buffer of at most one record's wire size (18,437 bytes), or
//!   65,535 while it gathers a handshake message that spans records (a TLS
//!   1.3 ticket): [`TLS_HOLDS`] is a bound on it with room to spare;
//! - TLS adds a header and a tag to every record, so the ciphertext still to
//!   come is longer than the plaintext: counting plaintext errs on the safe
//!   side.
//!
//! Below [`LEAST`] the mark is 1 (the kernel's default): a small literal
//! comes in a few records anyway, and a mark that changes costs a syscall.
//! It is set back to 1 as soon as the literal ends, after COMPRESS (whose
//! stream the filter cannot follow), and whenever the count cannot be made.
//! A mark is only changed when it must be lowered (it would exceed what is
//! sure to come) or when it can at least double: a few syscalls per large
//! literal, none per read. If the kernel refuses the option, the session
//! ends with that error rather than risk waiting.
//!
//! # What Linux does with it (6.x, `net/ipv4/tcp.c`, `include/net/tcp.h`)
//!
//! - `tcp_set_rcvlowat` caps the mark at half of `tcp_rmem[2]`, grows
//!   `sk_rcvbuf` so that the window can hold it, and calls `tcp_data_ready`
//!   at once, so a lowered mark that is already met wakes the reader at once.
//! - `tcp_data_ready` and `tcp_poll` report the socket readable when the
//!   queued bytes reach the mark, or under receive-memory pressure, or when
//!   the receive window has shrunk to one segment (`tcp_epollin_ready`): the
//!   kernel never lets the mark hold data back against a full buffer.
//! - A FIN (`SOCK_DONE`, `RCV_SHUTDOWN`), a reset and a socket error wake
//!   the reader whatever the mark: a server that closes mid-literal is seen.
//! - A non-blocking `recv` returns what is queued even below the mark: the
//!   mark delays only the wake-up, never a read.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The highest mark: one wake-up per 256 KiB, the size the relay and the
/// read-ahead move at once.
pub const MOST: u64 = 256 * 1024;

/// Below this many sure bytes the mark stays 1.
pub const LEAST: u64 = 64 * 1024;

/// The most that rustls can hold of the server's stream, as plaintext or as
/// ciphertext not yet decrypted: it reads only when it holds no plaintext,
/// into a buffer of at most one record's wire size (16,384 + 2,048 + 5
/// bytes), or 65,535 bytes while it gathers a handshake message. Taken
/// with room to spare for a rustls that buffers more.
pub const TLS_HOLDS: u64 = 96 * 1024;

/// A stream that can be told how many more bytes its peer is sure to send
/// before it waits for anything from us.
pub trait LowWater {
    /// `bytes` more bytes of this stream (as it reads them) are sure to come;
    /// 0 when nothing is sure. An error means the mark could not be lowered,
    /// and the stream must not be waited on.
    fn sure_to_come(&mut self, bytes: u64) -> io::Result<()>;
}

/// The mark a socket has, and when to change it.
#[derive(Debug, Default)]
pub struct Mark {
    /// The mark set last; 0 when never set (the kernel's default, 1).
    set: u32,
}

impl Mark {
    /// The mark to set now on a socket with `sure` bytes sure to come on
    /// it, or `None` when the one it has will do (see the module doc).
    pub fn next(&mut self, sure: u64) -> Option<u32> {
        let want = if sure >= LEAST {
            sure.min(MOST) as u32
        } else {
            1
        };
        let now = self.set.max(1);
        if want < now || want / 2 >= now {
            self.set = want;
            return Some(want);
        }
        None
    }

    /// Sets the mark of `socket` for `sure` bytes sure to come, if it must
    /// change.
    pub fn apply(&mut self, socket: &impl AsFd, sure: u64) -> io::Result<()> {
        // What the kernel does with the mark is checked for Linux alone.
        if !cfg!(target_os = "linux") {
            return Ok(());
        }
        match self.next(sure) {
            Some(mark) => set(socket, mark),
            None => Ok(()),
        }
    }
}

/// Sets `SO_RCVLOWAT` on `socket`.
pub fn set(socket: &impl AsFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is borrowed from a live socket, and the option
    // value is a `c_int` whose size is passed with it.
    let done = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads `SO_RCVLOWAT` back from `socket`.
#[cfg(test)]
pub fn get(socket: &impl AsFd) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as in `set`; `len` says how much the kernel may write.
    let done = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if done == 0 {
        Ok(value as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_never_exceeds_what_is_sure_and_changes_rarely() {
        let mut mark = Mark::default();
        assert_eq!(mark.next(0), None, "the kernel's default stays");
        assert_eq!(mark.next(LEAST - 1), None, "too little to bother");
        assert_eq!(mark.next(10 * MOST), Some(MOST as u32), "a large literal");
        assert_eq!(mark.next(5 * MOST), None, "no syscall per read");
        assert_eq!(mark.next(MOST), None);
        assert_eq!(mark.next(MOST - 1), Some(MOST as u32 - 1), "lowered");
        assert_eq!(mark.next(100_000), Some(100_000));
        assert_eq!(mark.next(150_000), None, "raised only when it doubles");
        assert_eq!(mark.next(LEAST - 1), Some(1), "back to 1 near the end");
        assert_eq!(mark.next(0), None);
        assert_eq!(mark.next(2 * LEAST), Some(2 * LEAST as u32));
        assert_eq!(mark.next(0), Some(1), "back to 1 when nothing is sure");
    }

    #[test]
    fn the_mark_is_read_back_as_set() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(get(&socket).unwrap(), 1);
        set(&socket, 200_000).unwrap();
        assert_eq!(get(&socket).unwrap(), 200_000);
        set(&socket, 1).unwrap();
        assert_eq!(get(&socket).unwrap(), 1);
    }
}
