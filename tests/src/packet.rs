//! Crafted Ethernet + IPv4 + TCP frames for the packet tests, and checks on what comes out.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const TCP_LEN: usize = 20;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Everything a test varies in a frame; `build` makes it with valid checksums.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub protocol: u8,
    /// 32-bit words of IP options (ihl = 5 + this).
    pub ip_option_words: u8,
    /// Raw IP flags and fragment offset field.
    pub frag_field: u16,
}

impl Frame {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0xaa, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0xaa, 0x02],
            src,
            dst,
            flags,
            seq: 0x0102_0304,
            ack: if flags & ACK != 0 { 0x0a0b_0c0d } else { 0 },
            payload: Vec::new(),
            protocol: 6,
            ip_option_words: 0,
            frag_field: 0x4000, // DF
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let ip_len = IP_LEN + 4 * usize::from(self.ip_option_words);
        let l4_len = TCP_LEN + self.payload.len();
        let mut f = Vec::with_capacity(ETH_LEN + ip_len + l4_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        // IPv4
        f.push(0x40 | (5 + self.ip_option_words));
        f.push(0);
        f.extend_from_slice(&((ip_len + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag_field.to_be_bytes());
        f.push(64);
        f.push(self.protocol);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        // IP options: all NOPs.
        f.extend(std::iter::repeat_n(
            1u8,
            4 * usize::from(self.ip_option_words),
        ));
        let ip_sum = checksum(&[&f[ETH_LEN..ETH_LEN + ip_len]]);
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
        // TCP
        let l4 = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push(5 << 4);
        f.push(self.flags);
        f.extend_from_slice(&64240u16.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(&self.payload);
        let sum = l4_checksum(&f[ETH_LEN..ETH_LEN + ip_len], &f[l4..]);
        f[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

/// One's complement of the one's complement sum of 16-bit words.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4_checksum(ip_header: &[u8], segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&ip_header[12..20]);
    pseudo.push(0);
    pseudo.push(ip_header[9]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    checksum(&[&pseudo, segment])
}

/// The fields of an IPv4/TCP frame without options, as a test reads them back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
}

/// Parse `frame` and assert that its IP and TCP checksums are valid.
pub fn parse_checked(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= ETH_LEN + IP_LEN + TCP_LEN, "frame too short");
    let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    assert_eq!(checksum(&[ip]), 0, "IP header checksum invalid");
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let segment = &frame[ETH_LEN + IP_LEN..ETH_LEN + tot_len];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    assert_eq!(checksum(&[&pseudo, segment]), 0, "TCP checksum invalid");
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([segment[at], segment[at + 1]]);
    let mac = |at: usize| <[u8; 6]>::try_from(&frame[at..at + 6]).expect("six bytes");
    Parsed {
        dst_mac: mac(0),
        src_mac: mac(6),
        src: SocketAddrV4::new(addr(12), port(0)),
        dst: SocketAddrV4::new(addr(16), port(2)),
        flags: segment[13],
    }
}

/// Byte ranges a full-NAT rewrite may change: MACs, IP checksum and addresses, TCP ports and
/// checksum. Everything else must come out as it went in.
pub fn assert_only_nat_fields_changed(before: &[u8], after: &[u8]) {
    assert_eq!(before.len(), after.len(), "frame length changed");
    let l4 = ETH_LEN + IP_LEN;
    let may_change = |i: usize| {
        i < 12
            || (ETH_LEN + 10..ETH_LEN + 12).contains(&i)
            || (ETH_LEN + 12..ETH_LEN + 20).contains(&i)
            || (l4..l4 + 4).contains(&i)
            || (l4 + 16..l4 + 18).contains(&i)
    };
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        assert!(
            may_change(i) || b == a,
            "byte {i} changed: {b:#04x} -> {a:#04x}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let frame = Frame::tcp(
            "10.0.0.1:1234".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
            SYN,
        )
        .with_payload(b"odd");
        let parsed = parse_checked(&frame.build());
        assert_eq!(parsed.flags, SYN);
        assert_eq!(parsed.dst.port(), 80);
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2 (before complement).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }
}
