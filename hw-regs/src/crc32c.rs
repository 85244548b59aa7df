//! CRC-32C (Castagnoli), the flow-table bucket hash (device.md section 10.2).

/// Reflected polynomial `0x82F63B78` (normal form `0x1EDC6F41`).
const POLY_REFLECTED: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0u32;
    while i < 256 {
        let mut crc = i;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i as usize] = crc;
        i += 1;
    }
    table
};

/// CRC-32C of `data`: reflected, initial value `0xFFFF_FFFF`, final XOR `0xFFFF_FFFF`
/// (the SSE4.2 `crc32` instruction's polynomial).
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFF_u32;
    for &byte in data {
        let index = (crc ^ u32::from(byte)) & 0xFF;
        crc = (crc >> 8) ^ TABLE[index as usize];
    }
    crc ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn known_vectors() {
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros and of 0xFF.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }
}
