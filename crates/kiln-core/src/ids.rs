//! Identifiers: short, random, lowercase, valid as names and in socket paths.

use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// `prefix-` followed by 10 random characters from an unambiguous alphabet (50 bits).
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let tail: String = (0..10)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}-{tail}")
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
pub fn new_mac() -> String {
    let b: [u8; 3] = rand::thread_rng().gen();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_names_and_distinct() {
        let a = new_id("sb");
        let b = new_id("sb");
        assert_ne!(a, b);
        assert!(crate::validate::is_valid_name(&a));
        assert_eq!(a.len(), 13);
        assert!(new_mac().starts_with("52:54:00:"));
    }
}
