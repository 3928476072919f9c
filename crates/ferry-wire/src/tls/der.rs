//! The little DER reading the verifier needs beyond what webpki exposes: the Ed25519 key in a
//! SubjectPublicKeyInfo, and a subject's common name.

/// `SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING (0 unused bits) }`, then the 32 key
/// bytes (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// PKCS#8 v1 `PrivateKeyInfo` of an Ed25519 key, before the 32 seed bytes (RFC 8410).
pub(crate) const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The public key of an Ed25519 SubjectPublicKeyInfo (DER, outer SEQUENCE included); `None`
/// for any other algorithm or encoding.
pub(crate) fn ed25519_key(spki: &[u8]) -> Option<[u8; 32]> {
    spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?.try_into().ok()
}

/// Splits one TLV off the front of `input`: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Iterates the TLVs of a constructed value's contents; stops at the first malformed one.
fn items(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = tlv(input)?;
        input = rest;
        Some((tag, value))
    })
}

const SET: u8 = 0x31;
const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
/// id-at-commonName, 2.5.4.3.
const CN: [u8; 3] = [0x55, 0x04, 0x03];
/// UTF8String, PrintableString, IA5String.
const STRINGS: [u8; 3] = [0x0c, 0x13, 0x16];

/// The first common name in a Name's contents (its RDN SETs, without the outer SEQUENCE tag).
pub(crate) fn common_name(subject: &[u8]) -> Option<String> {
    items(subject).filter(|(tag, _)| *tag == SET).flat_map(|(_, rdn)| items(rdn)).find_map(|(tag, atv)| {
        let mut it = items(atv);
        match (tag, it.next(), it.next()) {
            (SEQUENCE, Some((OID, oid)), Some((st, value))) if oid == CN && STRINGS.contains(&st) => {
                std::str::from_utf8(value).ok().map(str::to_owned)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_common_name() {
        // SET { SEQUENCE { OID 2.5.4.6, PrintableString "DE" } },
        // SET { SEQUENCE { OID 2.5.4.3, UTF8String "node1" } }
        let subject = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31, 0x0e, 0x30,
            0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'n', b'o', b'd', b'e', b'1',
        ];
        assert_eq!(common_name(&subject).as_deref(), Some("node1"));
        assert_eq!(common_name(&subject[..13]), None);
        assert_eq!(common_name(&subject[..20]), None, "truncated: no panic, no name");
        assert_eq!(common_name(&[]), None);
    }

    #[test]
    fn long_form_lengths() {
        let mut v = vec![0x04, 0x81, 200];
        v.extend([7u8; 200]);
        let (tag, value, rest) = tlv(&v).expect("long form");
        assert_eq!((tag, value.len(), rest.len()), (0x04, 200, 0));
        assert!(tlv(&[0x04, 0x80]).is_none(), "indefinite length refused");
        assert!(tlv(&[0x04, 0x82, 0x01]).is_none());
    }

    #[test]
    fn ed25519_key_only_from_an_ed25519_spki() {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend([9u8; 32]);
        assert_eq!(ed25519_key(&spki), Some([9; 32]));
        assert_eq!(ed25519_key(&spki[..43]), None);
        spki[8] = 0x71; // OID 1.3.101.113: Ed448
        assert_eq!(ed25519_key(&spki), None);
    }
}
