use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while building, listing or loading images. Messages are meant to be shown
/// to a person as they are: they say what is missing and, where there is one, the command that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("image {name:?} is not built (looked in {}); build it with `kiln image build {name}`", dir.display())]
    NotFound { name: String, dir: PathBuf },

    #[error("kiln does not know how to build an image called {name:?}; it can build: {known}")]
    UnknownTemplate { name: String, known: String },

    #[error("image {name:?} already exists in {}; pass --force to rebuild it", dir.display())]
    AlreadyExists { name: String, dir: PathBuf },

    #[error("`{tool}` was not found; it is needed to {purpose}. Install it with `apt-get install {package}`")]
    MissingTool {
        tool: String,
        package: String,
        purpose: String,
    },

    #[error("`{command}` failed ({status}){}", format_stderr(stderr))]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("manifest {} is unreadable: {source}; rebuild the image with `kiln image build --force {name}`", path.display())]
    Manifest {
        name: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A build step found something it cannot work with; the message explains what and how to fix it.
    #[error("{0}")]
    Build(String),
}

fn format_stderr(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(":\n{trimmed}")
    }
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error about a path, phrased as "cannot <action> <path>".
    pub(crate) fn path(action: &str, path: &Path, source: io::Error) -> Self {
        ImageError::io(format!("cannot {action} {}", path.display()), source)
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Adds a "cannot <action> <path>" context to plain `io::Result`s.
pub(crate) trait IoContext<T> {
    fn at(self, action: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &str, path: &Path) -> Result<T> {
        self.map_err(|e| ImageError::path(action, path, e))
    }
}
