//! SCRAM's `tls-server-end-point` channel binding (RFC 5929 §4): the hash of the
//! server's certificate, with the hash its signature uses (SHA-256 for MD5 and
//! SHA-1). With it, `channel_binding=require` works and a man in the middle
//! holding another valid certificate cannot relay the password exchange.

use ring::digest;

/// The binding data, or `None` for a signature with no single hash (Ed25519,
/// RSA-PSS): the server then sees no binding, as libpq does.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let algorithm = match signature_oid(cert_der)? {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1, sha256WithRSA, ecdsa-with-SHA256
        [42, 134, 72, 134, 247, 13, 1, 1, 4 | 5 | 11]
        | [42, 134, 72, 206, 61, 4, 1]
        | [42, 134, 72, 206, 61, 4, 3, 2] => &digest::SHA256,
        [42, 134, 72, 134, 247, 13, 1, 1, 12] | [42, 134, 72, 206, 61, 4, 3, 3] => &digest::SHA384,
        [42, 134, 72, 134, 247, 13, 1, 1, 13] | [42, 134, 72, 206, 61, 4, 3, 4] => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, cert_der).as_ref().to_vec())
}

/// The OID bytes of `Certificate.signatureAlgorithm`.
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = tlv(der, 0x30)?;
    let (_tbs, rest) = tlv(cert, 0x30)?;
    let (alg, _) = tlv(rest, 0x30)?;
    let (oid, _) = tlv(alg, 0x06)?;
    Some(oid)
}

/// One DER element of type `tag`: (contents, what follows).
fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let first = *b.get(1)?;
    let (len, start) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | x as usize);
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((b.get(start..end)?, b.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_bind_with_the_hash_of_their_signature() {
        for (alg, hash) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, &digest::SHA256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, &digest::SHA384),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let params = rcgen::CertificateParams::new(vec!["db".into()]).unwrap();
            let cert = params.self_signed(&key).unwrap();
            let want = digest::digest(hash, cert.der());
            assert_eq!(server_end_point(cert.der()).unwrap(), want.as_ref());
        }
    }

    #[test]
    fn garbage_binds_nothing() {
        for b in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 2, 0x30, 9],
        ] {
            assert_eq!(server_end_point(b), None);
        }
    }
}
