//! Content digests (`algorithm:hex`) as the OCI image spec defines them: parsed and
//! checked once, so a digest from hostile JSON can name a blob file (`blobs/<alg>/<hex>`)
//! or an index key without ever carrying a `/`, a `..` or an unbounded length. Also the
//! streaming hasher that checks bytes against one.

use std::fmt;

use sha2::{Digest as _, Sha256, Sha512};

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256 (64 hex digits): what every image tool writes.
    Sha256,
    /// SHA-512 (128 hex digits): allowed by the spec.
    Sha512,
}

impl Algorithm {
    /// Its name in a digest string.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A checked digest: a known algorithm and lowercase hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex`; `Err` says what is wrong (for one error line).
    pub fn parse(s: &str) -> Result<Digest, String> {
        let shown = || {
            let cut: String = s.chars().take(80).collect();
            if cut.len() < s.len() {
                format!("{cut:?}...")
            } else {
                format!("{cut:?}")
            }
        };
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(format!("bad digest {}: no algorithm", shown()));
        };
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(format!("bad digest {}: unsupported algorithm", shown())),
        };
        let ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(format!(
                "bad digest {}: {} needs {} lowercase hex digits",
                shown(),
                algorithm.name(),
                algorithm.hex_len()
            ));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The SHA-256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex(&Sha256::digest(bytes)),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex digits (safe as a file name).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The blob's path in an OCI layout: `blobs/<alg>/<hex>`.
    pub fn blob_path(&self) -> String {
        format!("blobs/{}/{}", self.algorithm.name(), self.hex)
    }

    /// A file-name-safe key (`sha256-<hex>`), for indexes kept in the cache dir.
    pub fn key(&self) -> String {
        format!("{}-{}", self.algorithm.name(), self.hex)
    }

    /// The first 12 hex digits, for progress lines.
    pub fn short(&self) -> &str {
        self.hex.get(..12).unwrap_or(&self.hex)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Hashes a stream with the algorithm of a digest it is to be checked against.
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-512.
    Sha512(Sha512),
}

impl Hasher {
    /// A hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex(&h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex(&h.finalize()),
            },
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_before_they_name_anything() {
        let good = format!("sha256:{}", "ab".repeat(32));
        let d = Digest::parse(&good).unwrap();
        assert_eq!(d.to_string(), good);
        assert_eq!(d.blob_path(), format!("blobs/sha256/{}", "ab".repeat(32)));
        assert_eq!(d.key(), format!("sha256-{}", "ab".repeat(32)));
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:ABCD",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("md5:{}", "ab".repeat(16)),
            &format!("sha256:{}/", "ab".repeat(32)),
            "nocolon",
            &"x".repeat(100_000),
        ] {
            let e = Digest::parse(bad).unwrap_err();
            assert!(e.len() < 200, "{e}");
        }
        assert_eq!(
            Digest::sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
