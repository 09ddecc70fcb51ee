//! A remote's settings and the object store they open. Credentials are never part of the settings: an
//! S3 remote takes them from the daemon's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`) or, when those are unset, from the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`, profile `AWS_PROFILE` or `default`).

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::chunk::{manifest_key, RemoteManifest, MAX_MANIFEST_BYTES};
use crate::{Error, ErrorKind, Result};

/// A remote as configured (`kiln remote add NAME URL`); what the API shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    pub name: String,
    /// `s3://BUCKET[/PREFIX]` or `file:///ABSOLUTE/DIR`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An S3-compatible endpoint (MinIO, Ceph RGW, R2...): `https://HOST[:PORT]`; `http://` is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl RemoteSpec {
    /// Checks the name and URL without contacting anything.
    pub fn check(&self) -> Result<()> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && self.name.as_bytes()[0].is_ascii_alphanumeric();
        if !name_ok {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "remote name '{}' is not valid: use 1-63 letters, digits, '-' or '_', starting with a letter or digit",
                    self.name.escape_debug()
                ),
            ));
        }
        parse_url(&self.url)?;
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.contains('@') {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("endpoint '{}' must be http(s)://HOST[:PORT] (credentials go in the environment, not the URL)", e.escape_debug()),
                ));
            }
        }
        Ok(())
    }
}

enum Target {
    Dir(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

fn parse_url(url: &str) -> Result<Target> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "remote URL '{}' {why}: use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR",
                url.escape_debug()
            ),
        )
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(bad("needs an absolute directory without '..'"));
        }
        return Ok(Target::Dir(path.into()));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            return Err(bad("has no valid bucket name"));
        }
        if prefix.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("has a prefix with '.' or '..'"));
        }
        return Ok(Target::S3 {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
        });
    }
    Err(bad("has an unknown scheme"))
}

/// An opened remote.
#[derive(Clone)]
pub struct Remote {
    pub name: String,
    pub(crate) store: Arc<dyn ObjectStore>,
}

/// A snapshot on a remote.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotEntry {
    pub name: String,
    /// Size of its manifest object.
    pub manifest_bytes: u64,
    pub pushed_at: String,
}

impl Remote {
    pub fn open(spec: &RemoteSpec) -> Result<Remote> {
        spec.check()?;
        let store: Arc<dyn ObjectStore> = match parse_url(&spec.url)? {
            Target::Dir(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(&format!("creating {}", dir.display()), e))?;
                Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(|e| {
                    Error::new(ErrorKind::Invalid, format!("remote {}: {e}", spec.name))
                })?)
            }
            Target::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                    if let Some((id, secret, token)) = credentials_file() {
                        b = b.with_access_key_id(id).with_secret_access_key(secret);
                        if let Some(t) = token {
                            b = b.with_token(t);
                        }
                    } else if !other_credential_source() {
                        // Without credentials the client would ask the instance metadata service,
                        // which only exists on a cloud instance: say so instead of probing for it.
                        return Err(Error::new(
                            ErrorKind::Invalid,
                            format!("remote {}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the daemon's environment, or write ~/.aws/credentials (on a cloud instance with a role, set KILN_REMOTE_INSTANCE_CREDENTIALS=1)", spec.name),
                        ));
                    }
                }
                if let Some(r) = &spec.region {
                    b = b.with_region(r);
                } else if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                if let Some(e) = &spec.endpoint {
                    b = b
                        .with_endpoint(e)
                        .with_allow_http(e.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                let s3 = b.build().map_err(|e| {
                    Error::new(ErrorKind::Invalid, format!("remote {}: {e}", spec.name))
                })?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                }
            }
        };
        Ok(Remote {
            name: spec.name.clone(),
            store,
        })
    }

    /// The snapshots pushed to it (complete pushes only: a manifest is written last).
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let prefix = ObjPath::from("snapshots");
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(&self.name, "listing snapshots", e))?;
        let mut out: Vec<SnapshotEntry> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.strip_suffix(".json")?.to_string();
                Some(SnapshotEntry {
                    name,
                    manifest_bytes: m.size,
                    pushed_at: m
                        .last_modified
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Reads and checks snapshot `name`'s manifest object.
    pub async fn manifest(&self, name: &str) -> Result<RemoteManifest> {
        let key = manifest_key(name);
        let path = ObjPath::from(key.as_str());
        let got = match self.store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("remote {} has no snapshot '{}' (`kiln remote snapshots {}` lists them; a push that did not complete is not listed)", self.name, name.escape_debug(), self.name),
                ))
            }
            Err(e) => return Err(Error::store(&self.name, &format!("reading {key}"), e)),
        };
        if got.meta.size > MAX_MANIFEST_BYTES {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "remote {}: {key} is {} bytes, not a plausible manifest",
                    self.name, got.meta.size
                ),
            ));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| Error::store(&self.name, &format!("reading {key}"), e))?;
        RemoteManifest::parse(&bytes, &format!("remote {}: {key}", self.name))
    }

    /// Removes snapshot `name` from the remote (its manifest; `gc` removes the chunks only it used).
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.manifest(name).await?;
        let key = manifest_key(name);
        self.store
            .delete(&ObjPath::from(key.as_str()))
            .await
            .map_err(|e| Error::store(&self.name, &format!("deleting {key}"), e))
    }
}

/// Whether the environment names another way to get credentials: web identity (Kubernetes IRSA), a
/// container credentials endpoint (ECS), or the instance metadata service when asked for.
fn other_credential_source() -> bool {
    [
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
        || std::env::var("KILN_REMOTE_INSTANCE_CREDENTIALS").as_deref() == Ok("1")
}

/// Access key, secret and token from the shared credentials file, if there is one with that profile.
fn credentials_file() -> Option<(String, String, Option<String>)> {
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".aws/credentials"))
        })?;
    let text = std::fs::read_to_string(path).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !inside {
            continue;
        }
        let v = v.trim().to_string();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some((id?, secret?, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_names_are_checked() {
        let spec = |name: &str, url: &str| RemoteSpec {
            name: name.into(),
            url: url.into(),
            region: None,
            endpoint: None,
        };
        assert!(spec("r1", "s3://my-bucket/kiln").check().is_ok());
        assert!(spec("r1", "file:///var/kiln-remote").check().is_ok());
        for (n, u) in [
            ("r1", "s3://A"),
            ("r1", "file://relative"),
            ("r1", "file:///a/../b"),
            ("r1", "http://x"),
            ("-x", "s3://bucket"),
            ("a/b", "s3://bucket"),
        ] {
            assert_eq!(
                spec(n, u).check().unwrap_err().kind,
                ErrorKind::Invalid,
                "{n} {u}"
            );
        }
    }
}
