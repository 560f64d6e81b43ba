//! Choosing one image out of an input: by reference (`--image REF`, matched against
//! the `org.opencontainers.image.ref.name` and `io.containerd.image.name` annotations
//! or `docker save`'s `RepoTags`, with Docker's short names normalised), and by
//! platform (`--platform os/arch[/variant]`, by default the host's) among the entries
//! of an image index. Every "nothing matches" error lists what is there.

use super::model::Platform;

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Select {
    /// `--image REF`.
    pub reference: Option<String>,
    /// `--platform`.
    pub platform: Option<Platform>,
}

/// Annotation naming an image in an OCI layout (often only its tag).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd and Docker 25+ write with the full name.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Parses `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Result<Platform, String> {
    let parts: Vec<&str> = s.split('/').collect();
    let ok = (2..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty());
    if !ok {
        return Err(format!(
            "bad platform {s:?}: expected os/arch[/variant], e.g. linux/arm64"
        ));
    }
    Ok(Platform {
        os: parts[0].to_string(),
        architecture: normalize_arch(parts[1]).to_string(),
        variant: parts.get(2).map(|v| v.to_string()),
        os_version: None,
    })
}

fn normalize_arch(a: &str) -> &str {
    match a {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" => "386",
        "armhf" | "armel" => "arm",
        other => other,
    }
}

/// The platform of this machine, in OCI terms.
pub fn host_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "powerpc64" => ("ppc64le", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    };
    Platform {
        os: std::env::consts::OS.to_string(),
        architecture: architecture.to_string(),
        variant: variant.map(str::to_string),
        os_version: None,
    }
}

/// Whether `have` satisfies `want` (a missing wanted variant accepts any; arm64's
/// default variant is v8).
pub fn platform_matches(want: &Platform, have: &Platform) -> bool {
    if want.os != have.os
        || normalize_arch(&want.architecture) != normalize_arch(&have.architecture)
    {
        return false;
    }
    let Some(wv) = want.variant.as_deref().filter(|v| !v.is_empty()) else {
        return true;
    };
    let hv = have.variant.as_deref().filter(|v| !v.is_empty());
    match hv {
        Some(hv) => hv == wv,
        None => normalize_arch(&have.architecture) == "arm64" && wv == "v8",
    }
}

/// Picks among `(index, platform)` entries: the explicit platform, else the host's
/// (an exact variant match first). `None` if nothing fits.
pub fn pick_platform(entries: &[(usize, Platform)], wanted: Option<&Platform>) -> Option<usize> {
    let host = host_platform();
    let want = wanted.unwrap_or(&host);
    let fits: Vec<&(usize, Platform)> = entries
        .iter()
        .filter(|(_, p)| platform_matches(want, p))
        .collect();
    if wanted.is_none() {
        if let Some((i, _)) = fits.iter().find(|(_, p)| p.variant == host.variant) {
            return Some(*i);
        }
    }
    fits.first().map(|(i, _)| *i)
}

/// Docker's canonical form of a name: `docker.io/library/` added to short names,
/// `:latest` to names without a tag or digest.
pub fn normalize_ref(r: &str) -> String {
    let (name, suffix) = match r.find('@') {
        Some(i) => (&r[..i], &r[i..]),
        None => {
            let last_slash = r.rfind('/').map_or(0, |i| i + 1);
            match r[last_slash..].find(':') {
                Some(i) => (&r[..last_slash + i], &r[last_slash + i..]),
                None => (r, ":latest"),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    full.push_str(suffix);
    full
}

/// Whether the image named `names` is what `wanted` asks for: an exact name (an OCI
/// ref name is often only a tag), or the same name once normalised.
pub fn ref_matches(wanted: &str, names: &[String]) -> bool {
    let norm = normalize_ref(wanted);
    names
        .iter()
        .any(|n| n == wanted || normalize_ref(n) == norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_and_references() {
        let p = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            parse_platform("linux/x86_64").unwrap().architecture,
            "amd64"
        );
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux//v7").is_err());
        let arm64 = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            ..Default::default()
        };
        assert!(platform_matches(&p, &arm64));
        assert!(!platform_matches(
            &parse_platform("linux/arm64/v9").unwrap(),
            &arm64
        ));
        assert!(!platform_matches(
            &parse_platform("linux/amd64").unwrap(),
            &arm64
        ));
        let entries = vec![
            (0, parse_platform("linux/arm/v6").unwrap()),
            (1, parse_platform("linux/arm/v7").unwrap()),
            (2, host_platform()),
        ];
        assert_eq!(pick_platform(&entries, None), Some(2));
        assert_eq!(
            pick_platform(&entries, Some(&parse_platform("linux/arm").unwrap())),
            Some(0)
        );
        assert_eq!(
            pick_platform(&entries, Some(&parse_platform("linux/s390x").unwrap())),
            None
        );

        assert_eq!(normalize_ref("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize_ref("me/app:1"), "docker.io/me/app:1");
        assert_eq!(
            normalize_ref("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            normalize_ref("quay.io/a/b@sha256:00"),
            "quay.io/a/b@sha256:00"
        );
        assert!(ref_matches("app:1", &["docker.io/library/app:1".into()]));
        assert!(ref_matches("latest", &["latest".into()]));
        assert!(!ref_matches("app:2", &["app:1".into()]));
    }
}
