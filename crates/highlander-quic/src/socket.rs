//! A UDP socket that watches what arrives: quinn drops datagrams that are not QUIC without a
//! word, so this wrapper notices them and logs one throttled line. It never changes what quinn
//! receives.

use crate::throttle::{Kind, Throttle, warn_throttled};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The only QUIC version the endpoints speak (RFC 9000).
pub(crate) const QUIC_V1: u32 = 1;

/// The smallest datagram a QUIC peer sends: RFC 9000 §10.3 makes even a stateless reset 21
/// bytes or more.
const MIN_DATAGRAM: usize = 21;

pub(crate) struct ObservedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    throttle: Arc<Throttle>,
}

impl ObservedSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, throttle: Arc<Throttle>) -> ObservedSocket {
        ObservedSocket { inner, throttle }
    }

    fn inspect(&self, from: SocketAddr, datagram: &[u8]) {
        if let Some(reason) = not_quic(datagram) {
            warn_throttled!(
                self.throttle,
                (Kind::Garbage, None),
                %from,
                len = datagram.len(),
                reason,
                "dropped a datagram that is not QUIC for this node"
            );
        }
    }
}

/// Why a datagram cannot be a QUIC v1 packet from a highlander peer, if it cannot. Packets
/// with an unknown connection id pass: a restarted peer's stateless resets look like that.
pub(crate) fn not_quic(datagram: &[u8]) -> Option<&'static str> {
    let Some(&first) = datagram.first() else {
        return Some("empty");
    };
    if datagram.len() < MIN_DATAGRAM {
        return Some("too short");
    }
    // The endpoints never grease the fixed bit, so every packet of ours has it set.
    if first & 0x40 == 0 {
        return Some("the QUIC fixed bit is clear");
    }
    if first & 0x80 != 0 {
        let version = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
        // 0 is version negotiation, the answer to a peer that speaks another version.
        if version != QUIC_V1 && version != 0 {
            return Some("an unsupported QUIC version");
        }
    }
    None
}

impl fmt::Debug for ObservedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSocket").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ObservedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let result = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &result {
            for (buf, m) in bufs.iter().zip(meta.iter()).take(*n) {
                let data = buf.get(..m.len).unwrap_or(buf);
                // With GRO one buffer holds several datagrams of `stride` bytes each.
                for datagram in data.chunks(m.stride.max(1)) {
                    self.inspect(m.addr, datagram);
                }
            }
        }
        result
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(not_quic(&[]), Some("empty"));
        assert_eq!(not_quic(b"hello"), Some("too short"));
        assert_eq!(not_quic(&[0u8; 64]), Some("the QUIC fixed bit is clear"));
        assert_eq!(not_quic(&[0xff; 64]), Some("an unsupported QUIC version"));
        let mut initial = vec![0xc0, 0, 0, 0, 1];
        initial.resize(1200, 0);
        assert_eq!(not_quic(&initial), None);
        let mut short = vec![0x40];
        short.resize(40, 7);
        assert_eq!(not_quic(&short), None);
    }
}
