//! Errors with stable machine-readable codes. The HTTP layer maps each code to a status; the message always
//! says what went wrong and what to do about it.

use std::fmt;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    SandboxNotFound,
    SandboxNameTaken,
    SandboxNotRunning,
    SandboxBusy,
    SnapshotNotFound,
    SnapshotAlreadyExists,
    ImageNotFound,
    GuestPathNotFound,
    GuestPathConflict,
    GuestPermissionDenied,
    GuestDiskFull,
    GuestError,
    ExecFailed,
    CapacityExceeded,
    InsufficientStorage,
    SnapshotInUse,
    SnapshotCorrupt,
    SnapshotBaseMissing,
    SnapshotBaseChanged,
    SnapshotIncompatible,
    SnapshotAlreadyRestored,
    VolumeNotFound,
    VolumeAlreadyExists,
    VolumeInUse,
    BootFailed,
    VmFailed,
    Timeout,
    AgentUnavailable,
    Unauthorized,
    OperationNotFound,
    SandboxUnresponsive,
    PortInUse,
    PortNotFound,
    OperationInterrupted,
    /// A resume asked for resources the snapshot's machine cannot take (less memory than it holds, more
    /// vCPUs than it has, or any change to a machine recorded without spare vCPUs).
    ResourceOverrideRefused,
    Internal,
    /// No background process with that pid in the sandbox.
    ProcessNotFound,
    /// The sandbox's guest agent is too old for the request (rebuild the image).
    AgentOutdated,
    /// A tar entry would land outside the guest directory it is unpacked into.
    PathEscape,
    /// No remote of that name is configured (`kiln remote add`).
    RemoteNotFound,
    /// A remote of that name is already configured.
    RemoteAlreadyExists,
    /// The remote's object storage could not be reached or refused the request.
    RemoteUnavailable,
    /// `kiln image rm`: sandboxes use the image (or were still being created from images).
    ImageInUse,
    /// `kiln image build -f`: neither buildah nor a docker with a running daemon is installed.
    ImageBuilderMissing,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::SandboxNotFound => "sandbox_not_found",
            ErrorCode::SandboxNameTaken => "sandbox_name_taken",
            ErrorCode::SandboxNotRunning => "sandbox_not_running",
            ErrorCode::SandboxBusy => "sandbox_busy",
            ErrorCode::SnapshotNotFound => "snapshot_not_found",
            ErrorCode::SnapshotAlreadyExists => "snapshot_already_exists",
            ErrorCode::ImageNotFound => "image_not_found",
            ErrorCode::GuestPathNotFound => "guest_path_not_found",
            ErrorCode::GuestPathConflict => "guest_path_conflict",
            ErrorCode::GuestPermissionDenied => "guest_permission_denied",
            ErrorCode::GuestDiskFull => "guest_disk_full",
            ErrorCode::GuestError => "guest_error",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::CapacityExceeded => "capacity_exceeded",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::SnapshotInUse => "snapshot_in_use",
            ErrorCode::SnapshotCorrupt => "snapshot_corrupt",
            ErrorCode::SnapshotBaseMissing => "snapshot_base_missing",
            ErrorCode::SnapshotBaseChanged => "snapshot_base_changed",
            ErrorCode::SnapshotIncompatible => "snapshot_incompatible",
            ErrorCode::SnapshotAlreadyRestored => "snapshot_already_restored",
            ErrorCode::VolumeNotFound => "volume_not_found",
            ErrorCode::VolumeAlreadyExists => "volume_already_exists",
            ErrorCode::VolumeInUse => "volume_in_use",
            ErrorCode::BootFailed => "boot_failed",
            ErrorCode::VmFailed => "vm_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::AgentUnavailable => "agent_unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::OperationNotFound => "operation_not_found",
            ErrorCode::SandboxUnresponsive => "sandbox_unresponsive",
            ErrorCode::PortInUse => "port_in_use",
            ErrorCode::PortNotFound => "port_not_found",
            ErrorCode::OperationInterrupted => "operation_interrupted",
            ErrorCode::ResourceOverrideRefused => "resource_override_refused",
            ErrorCode::Internal => "internal",
            ErrorCode::ProcessNotFound => "process_not_found",
            ErrorCode::AgentOutdated => "agent_outdated",
            ErrorCode::PathEscape => "path_escape",
            ErrorCode::RemoteNotFound => "remote_not_found",
            ErrorCode::RemoteAlreadyExists => "remote_already_exists",
            ErrorCode::RemoteUnavailable => "remote_unavailable",
            ErrorCode::ImageInUse => "image_in_use",
            ErrorCode::ImageBuilderMissing => "image_builder_missing",
        }
    }

    /// The HTTP status this error is reported with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::GuestPermissionDenied => 403,
            ErrorCode::GuestPathConflict => 409,
            ErrorCode::GuestDiskFull => 507,
            ErrorCode::Unauthorized => 401,
            ErrorCode::ProcessNotFound => 404,
            ErrorCode::AgentOutdated => 409,
            ErrorCode::PathEscape => 400,
            ErrorCode::RemoteNotFound => 404,
            ErrorCode::RemoteAlreadyExists => 409,
            ErrorCode::RemoteUnavailable => 502,
            ErrorCode::ImageInUse => 409,
            ErrorCode::ImageBuilderMissing => 501,
            ErrorCode::SandboxNotFound
            | ErrorCode::SnapshotNotFound
            | ErrorCode::ImageNotFound
            | ErrorCode::GuestPathNotFound
            | ErrorCode::VolumeNotFound
            | ErrorCode::OperationNotFound
            | ErrorCode::PortNotFound => 404,
            ErrorCode::SandboxNameTaken
            | ErrorCode::SandboxNotRunning
            | ErrorCode::SandboxBusy
            | ErrorCode::SnapshotAlreadyExists
            | ErrorCode::SnapshotInUse
            | ErrorCode::SnapshotBaseMissing
            | ErrorCode::SnapshotBaseChanged
            | ErrorCode::SnapshotAlreadyRestored
            | ErrorCode::VolumeAlreadyExists
            | ErrorCode::VolumeInUse
            | ErrorCode::ResourceOverrideRefused
            | ErrorCode::PortInUse => 409,
            ErrorCode::SnapshotCorrupt | ErrorCode::SnapshotIncompatible => 422,
            // The command is the caller's: the guest ran fine, the program could not be started.
            ErrorCode::ExecFailed => 422,
            ErrorCode::InsufficientStorage => 507,
            ErrorCode::CapacityExceeded => 429,
            ErrorCode::GuestError | ErrorCode::AgentUnavailable => 502,
            ErrorCode::Timeout => 504,
            ErrorCode::SandboxUnresponsive => 503,
            ErrorCode::BootFailed
            | ErrorCode::VmFailed
            | ErrorCode::OperationInterrupted
            | ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidRequest, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
    pub fn snapshot_not_found(id: &str) -> Self {
        Error::new(
            ErrorCode::SnapshotNotFound,
            format!("no snapshot has the id '{id}'; list snapshots with `kiln snapshot list`"),
        )
    }
    pub fn sandbox_not_found(id: &str) -> Self {
        Error::new(
            ErrorCode::SandboxNotFound,
            format!(
                "no sandbox has the id or name '{id}'; list sandboxes with `kiln sandbox list`"
            ),
        )
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::internal(format!("state database error: {e}"))
    }
}

impl From<kiln_vmm::VmmError> for Error {
    fn from(e: kiln_vmm::VmmError) -> Self {
        let code = match e {
            kiln_vmm::VmmError::Unresponsive { .. } => ErrorCode::SandboxUnresponsive,
            _ => ErrorCode::VmFailed,
        };
        Error::new(code, e.to_string())
    }
}
