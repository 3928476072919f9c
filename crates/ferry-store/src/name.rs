//! Checkpoint names become directory names: only a safe alphabet, never a path.

use crate::StoreError;

const MAX_NAME: usize = 128;

/// Accepts `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |why| Err(StoreError::InvalidName { name: name.chars().take(MAX_NAME).collect(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad("it is longer than 128 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("it must start with a letter or digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["web1", "pid-123-1700000000", "a.b_c-d", "9"] {
            validate_name(n).expect(n);
        }
    }

    #[test]
    fn refuses_paths_and_oddities() {
        let long = "x".repeat(129);
        for n in ["", "..", ".hidden", "a/b", "../etc", "-rf", "a b", "ünï", "a\0b", long.as_str()] {
            assert!(validate_name(n).is_err(), "{n:?} must be refused");
        }
    }
}
