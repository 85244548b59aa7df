//! The XDP program in front of the AF_XDP sockets, as eBPF instructions built here (no
//! clang, no ELF): it redirects what the dataplane owns to the socket bound to the
//! frame's receive queue and passes everything else to the kernel.
//!
//! Redirected: Ethernet frames of type IPv4 (0x0800), ARP (0x0806) and 802.1Q VLAN
//! (0x8100), the frames the software gateway handles (ARP and ICMP to its own
//! addresses included). Passed to the kernel (`XDP_PASS`): everything else (IPv6 with
//! its neighbour discovery, LLDP, runts shorter than an Ethernet header) and every frame
//! of a queue with no socket in the XSKMAP (`bpf_redirect_map`'s fallback action), so
//! nothing the dataplane does not own is lost.
//!
//! ```text
//!  0: r2 = *(u32 *)(r1 + 0)        ; xdp_md.data
//!  1: r3 = *(u32 *)(r1 + 4)        ; xdp_md.data_end
//!  2: r4 = r2
//!  3: r4 += 14
//!  4: if r4 > r3 goto pass         ; shorter than an Ethernet header
//!  5: r4 = *(u16 *)(r2 + 12)       ; EtherType, network order read little-endian
//!  6: if r4 == 0x0008 goto redirect
//!  7: if r4 == 0x0608 goto redirect
//!  8: if r4 == 0x0081 goto redirect
//!  9: pass: r0 = XDP_PASS
//! 10: exit
//! 11: redirect: r2 = *(u32 *)(r1 + 16)  ; xdp_md.rx_queue_index
//! 12: r1 = map fd (ld_imm64, 2 slots)
//! 14: r3 = XDP_PASS                 ; the action when the queue has no socket
//! 15: call bpf_redirect_map
//! 16: exit
//! ```

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low nibble) and source register (high nibble).
    pub regs: u8,
    /// Signed offset.
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

pub(super) const R0: u8 = 0;
pub(super) const R1: u8 = 1;
pub(super) const R2: u8 = 2;
pub(super) const R3: u8 = 3;
pub(super) const R4: u8 = 4;

pub(super) const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub(super) const LDX_H: u8 = 0x69; // BPF_LDX | BPF_MEM | BPF_H
pub(super) const MOV64_X: u8 = 0xbf;
pub(super) const MOV64_K: u8 = 0xb7;
pub(super) const ADD64_K: u8 = 0x07;
pub(super) const JGT_X: u8 = 0x2d;
pub(super) const JEQ_K: u8 = 0x15;
pub(super) const LD_IMM64: u8 = 0x18;
pub(super) const CALL: u8 = 0x85;
pub(super) const EXIT: u8 = 0x95;
/// `src_reg` of `ld_imm64` saying the immediate is a map descriptor.
pub(super) const PSEUDO_MAP_FD: u8 = 1;
const FN_REDIRECT_MAP: i32 = 51;
/// `XDP_PASS`.
pub const XDP_PASS: i32 = 2;

pub(super) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The EtherTypes redirected to the sockets, as the program compares them (network
/// byte order loaded as a little-endian `u16`).
const REDIRECTED: [u16; 3] = [0x0800, 0x0806, 0x8100];

/// The program, with the XSKMAP descriptor `map_fd` in its `ld_imm64`.
#[must_use]
pub fn redirect_program(map_fd: i32) -> Vec<BpfInsn> {
    let pass: i16 = 9;
    let redirect: i16 = 11;
    let mut p = vec![
        insn(LDX_W, R2, R1, 0, 0),
        insn(LDX_W, R3, R1, 4, 0),
        insn(MOV64_X, R4, R2, 0, 0),
        insn(ADD64_K, R4, 0, 0, 14),
    ];
    // Jump offsets count from the next instruction.
    p.push(insn(JGT_X, R4, R3, pass - 5, 0));
    p.push(insn(LDX_H, R4, R2, 12, 0));
    for ty in REDIRECTED {
        let at = i16::try_from(p.len()).unwrap_or(i16::MAX);
        let wire = i32::from(u16::from_le_bytes(ty.to_be_bytes()));
        p.push(insn(JEQ_K, R4, 0, redirect - at - 1, wire));
    }
    p.push(insn(MOV64_K, R0, 0, 0, XDP_PASS));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p.push(insn(LDX_W, R2, R1, 16, 0));
    p.push(insn(LD_IMM64, R1, PSEUDO_MAP_FD, 0, map_fd));
    p.push(insn(0, 0, 0, 0, 0));
    p.push(insn(MOV64_K, R3, 0, 0, XDP_PASS));
    p.push(insn(CALL, 0, 0, 0, FN_REDIRECT_MAP));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// What the program does with `frame` when its queue has a socket: an executable
/// model of the instructions above, pinned to them by the tests.
#[must_use]
pub fn redirects(frame: &[u8]) -> bool {
    frame
        .get(12..14)
        .is_some_and(|t| REDIRECTED.contains(&u16::from_be_bytes([t[0], t[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for exactly the instructions the program uses, run on a
    /// frame: returns `Some(queue)` for a redirect, `None` for `XDP_PASS`.
    fn run(prog: &[BpfInsn], frame: &[u8], queue: u32) -> Option<u32> {
        // eBPF sign-extends 32-bit immediates to 64 bits.
        let imm = |i: BpfInsn| u64::from_ne_bytes(i64::from(i.imm).to_ne_bytes());
        let jump = |pc: usize, off: i16| pc.checked_add_signed(isize::from(off)).expect("jump");
        let mut r = [0u64; 11];
        let data_end = u64::try_from(frame.len()).expect("length");
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 100, "no loop in the program");
            let i = prog[pc];
            let (dst, src) = (usize::from(i.regs & 0x0f), usize::from(i.regs >> 4));
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "32-bit loads only from the context");
                    r[dst] = match i.off {
                        0 => 0,
                        4 => data_end,
                        16 => u64::from(queue),
                        o => panic!("context offset {o}"),
                    };
                }
                LDX_H => {
                    let at = jump(usize::try_from(r[src]).expect("address"), i.off);
                    assert!(
                        at + 2 <= frame.len(),
                        "verifier would reject: unchecked read"
                    );
                    r[dst] = u64::from(u16::from_le_bytes([frame[at], frame[at + 1]]));
                }
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = imm(i),
                ADD64_K => r[dst] += imm(i),
                JGT_X if r[dst] > r[src] => pc = jump(pc, i.off),
                JEQ_K if r[dst] == imm(i) => pc = jump(pc, i.off),
                JGT_X | JEQ_K => {}
                LD_IMM64 => {
                    assert_eq!(src, usize::from(PSEUDO_MAP_FD));
                    r[dst] = 0xfeed;
                    pc += 1;
                }
                CALL => {
                    assert_eq!(i.imm, FN_REDIRECT_MAP);
                    assert_eq!(r[1], 0xfeed, "map argument");
                    assert_eq!(r[3], u64::from(XDP_PASS.unsigned_abs()), "fallback action");
                    return Some(u32::try_from(r[2]).expect("queue"));
                }
                EXIT => {
                    assert_eq!(r[0], u64::from(XDP_PASS.unsigned_abs()));
                    return None;
                }
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn frame(ethertype: u16, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(14)];
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f.truncate(len);
        f
    }

    #[test]
    fn instruction_layout_is_struct_bpf_insn() {
        assert_eq!(size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::offset_of!(BpfInsn, regs), 1);
        assert_eq!(std::mem::offset_of!(BpfInsn, off), 2);
        assert_eq!(std::mem::offset_of!(BpfInsn, imm), 4);
        let ld = redirect_program(7)[12];
        assert_eq!((ld.code, ld.regs, ld.imm), (0x18, 0x11, 7));
    }

    #[test]
    fn ipv4_arp_and_vlan_are_redirected_to_their_queue() {
        let p = redirect_program(3);
        for ty in [0x0800, 0x0806, 0x8100] {
            assert_eq!(run(&p, &frame(ty, 60), 5), Some(5), "ethertype {ty:#06x}");
            assert!(redirects(&frame(ty, 60)));
        }
    }

    #[test]
    fn other_frames_and_runts_pass_to_the_kernel() {
        let p = redirect_program(3);
        for (ty, len) in [(0x86dd, 80), (0x88cc, 60), (0x0800, 13), (0x0608, 60)] {
            assert_eq!(
                run(&p, &frame(ty, len), 0),
                None,
                "ethertype {ty:#06x} len {len}"
            );
            assert!(!redirects(&frame(ty, len)));
        }
    }
}
