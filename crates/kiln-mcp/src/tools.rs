//! The tools. Each maps to one API call; descriptions tell a model when to use which.

use std::sync::Arc;

use base64::Engine as _;
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ApiError, Body, Daemon};

/// Text files up to this size are returned as text; larger reads are refused (use run_command to look
/// at parts of them).
const MAX_READ_BYTES: usize = 1 << 20;

const INSTRUCTIONS: &str = "kiln runs Linux sandboxes (microVMs) on this host. Typical use: create_sandbox, \
then run_command / write_file / read_file in it. Before a risky step (installing packages, editing \
many files, running a migration), call snapshot to checkpoint the sandbox; if the step goes wrong, call \
restore_snapshot with that snapshot to roll the same sandbox back to exactly that moment (memory, \
processes and disk). resume_snapshot instead starts a NEW sandbox from a snapshot, and fork_sandbox \
copies a running sandbox into new ones, for trying alternatives side by side. Delete sandboxes you no \
longer need. Errors carry a stable code in brackets, e.g. [sandbox_not_found].";

fn enc(s: &str) -> String {
    // Path segments and query values: keep unreserved characters, escape the rest.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn tool_error(e: ApiError) -> CallToolResult {
    let mut r = CallToolResult::structured_error(json!({
        "error": {"code": e.code, "message": e.message}
    }));
    // The text a model reads first: the message, then the code.
    r.content = vec![rmcp::model::ContentBlock::text(format!(
        "error [{}]: {}",
        e.code, e.message
    ))];
    r
}

fn ok(v: Value) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::structured(v))
}

fn parse(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError {
        code: "bad_response".into(),
        message: format!("the daemon answered something that is not JSON ({e})"),
    })
}

/// Only what a model needs to know about a sandbox.
fn sandbox_summary(v: &Value) -> Value {
    json!({
        "id": v["id"], "name": v["name"], "state": v["state"], "template": v["template"],
        "memory_mib": v["memory_mib"], "cpus": v["cpus"], "created_at": v["created_at"],
        "origin": v["origin"],
    })
}

fn snapshot_summary(v: &Value) -> Value {
    json!({
        "id": v["id"], "names": v["names"], "sandbox_id": v["sandbox_id"], "sandbox_name": v["sandbox_name"],
        "type": v["type"], "created_at": v["created_at"], "size_bytes": v["size_bytes"],
    })
}

#[derive(Deserialize, JsonSchema)]
pub struct CreateSandbox {
    /// Guest image (default "tiny", a small Linux with a shell and busybox tools).
    pub template: Option<String>,
    /// A name to refer to it by (default: its id).
    pub name: Option<String>,
    /// Memory in MiB (default 256).
    pub memory_mib: Option<u64>,
    /// Virtual CPUs (default 1).
    pub cpus: Option<u32>,
    /// Allow network connections out of the sandbox (default true).
    pub egress: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
pub struct RunCommand {
    /// Sandbox id or name.
    pub sandbox: String,
    /// A shell command line, run with /bin/sh -c as root, e.g. "ls -la /tmp && cat /etc/os-release".
    pub command: String,
    /// Working directory (absolute path in the sandbox).
    pub cwd: Option<String>,
    /// Kill the command after this many seconds (default 120).
    pub timeout_seconds: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct FilePath {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Absolute path inside the sandbox.
    pub path: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct WriteFile {
    /// Sandbox id or name.
    pub sandbox: String,
    /// Absolute path inside the sandbox; parent directories are created.
    pub path: String,
    /// The whole new content of the file (it is replaced, not appended to).
    pub content: String,
    /// Set when `content` is base64 for binary data.
    #[serde(default)]
    pub base64: bool,
    /// Octal permission bits such as "0755" (default 0644).
    pub mode: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct TakeSnapshot {
    /// Sandbox id or name.
    pub sandbox: String,
    /// A name for the checkpoint, e.g. "before-upgrade" (unique among snapshots; default: its id).
    pub name: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct RestoreSnapshot {
    /// Snapshot id or name.
    pub snapshot: String,
    /// Roll back again to a snapshot that was restored before (default true: checkpoints are meant to be
    /// returned to more than once).
    pub force: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
pub struct ResumeSnapshot {
    /// Snapshot id or name.
    pub snapshot: String,
    /// Name of the new sandbox (default: its id).
    pub name: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct Fork {
    /// Sandbox id or name (running).
    pub sandbox: String,
    /// How many copies (default 1, at most 16).
    pub count: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct SandboxRef {
    /// Sandbox id or name.
    pub sandbox: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct SnapshotRef {
    /// Snapshot id or name.
    pub snapshot: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct Nothing {}

/// The MCP server: kiln's tools over a [`Daemon`].
#[derive(Clone)]
pub struct Kiln {
    daemon: Arc<dyn Daemon>,
    tool_router: ToolRouter<Self>,
}

impl Kiln {
    pub fn new(daemon: Arc<dyn Daemon>) -> Kiln {
        Kiln {
            daemon,
            tool_router: Self::tool_router(),
        }
    }

    async fn json(
        &self,
        method: &'static str,
        path: String,
        body: Body,
    ) -> Result<Value, ApiError> {
        parse(&self.daemon.request(method, path, body).await?)
    }
}

/// Runs an API call and turns its error into a tool error (a result the model sees, with kiln's code).
macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(tool_error(e)),
        }
    };
}

#[tool_router]
impl Kiln {
    #[tool(
        description = "Create a new Linux sandbox (a small virtual machine) and start it. Returns its id; pass the id (or the name you gave) to the other tools. Takes a few seconds."
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateSandbox>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({});
        for (k, v) in [
            ("template", p.template.map(Value::from)),
            ("name", p.name.map(Value::from)),
            ("memory_mib", p.memory_mib.map(Value::from)),
            ("cpus", p.cpus.map(Value::from)),
            ("egress", p.egress.map(Value::from)),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        let sb = attempt!(
            self.json("POST", "/v1/sandboxes".into(), Body::Json(body))
                .await
        );
        ok(sandbox_summary(&sb))
    }

    #[tool(
        description = "Run a shell command in a sandbox and wait for it. Returns exit_code, stdout and stderr (each cut at 1 MiB; truncated says so). A non-zero exit_code is the command's own failure, not a tool error. Commands do not share a shell: cd or export in one call does not carry to the next (use cwd, or chain with &&)."
    )]
    async fn run_command(
        &self,
        Parameters(p): Parameters<RunCommand>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({
            "cmd": p.command,
            "timeout_ms": p.timeout_seconds.unwrap_or(120).saturating_mul(1000),
        });
        if let Some(cwd) = p.cwd {
            body["cwd"] = cwd.into();
        }
        let r = attempt!(
            self.json(
                "POST",
                format!("/v1/sandboxes/{}/exec", enc(&p.sandbox)),
                Body::Json(body)
            )
            .await
        );
        ok(json!({
            "exit_code": r["exit_code"], "stdout": r["stdout"], "stderr": r["stderr"],
            "timed_out": r["timed_out"], "signal": r["signal"], "truncated": r["truncated"],
        }))
    }

    #[tool(
        description = "Read a file from a sandbox. Returns its content as text, or as base64 (base64: true) when it is not UTF-8. Files over 1 MiB are refused: look at them with run_command (head, tail, grep)."
    )]
    async fn read_file(
        &self,
        Parameters(p): Parameters<FilePath>,
    ) -> Result<CallToolResult, ErrorData> {
        let bytes = attempt!(
            self.daemon
                .request(
                    "GET",
                    format!(
                        "/v1/sandboxes/{}/files?path={}",
                        enc(&p.sandbox),
                        enc(&p.path)
                    ),
                    Body::None,
                )
                .await
        );
        if bytes.len() > MAX_READ_BYTES {
            return Ok(tool_error(ApiError {
                code: "file_too_large".into(),
                message: format!(
                    "{} is {} bytes, over the 1 MiB this tool returns; read parts of it with run_command (head -c, tail, grep)",
                    p.path,
                    bytes.len()
                ),
            }));
        }
        match String::from_utf8(bytes) {
            Ok(text) => ok(json!({"path": p.path, "content": text, "base64": false})),
            Err(e) => ok(json!({
                "path": p.path,
                "content": base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
                "base64": true,
            })),
        }
    }

    #[tool(
        description = "Write a file in a sandbox, replacing it if it exists (parent directories are created). Give the whole content; set base64 for binary data."
    )]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteFile>,
    ) -> Result<CallToolResult, ErrorData> {
        let data = if p.base64 {
            attempt!(base64::engine::general_purpose::STANDARD
                .decode(p.content.as_bytes())
                .map_err(|e| ApiError {
                    code: "invalid_request".into(),
                    message: format!(
                        "content is not valid base64 ({e}); send text with base64 false"
                    ),
                }))
        } else {
            p.content.into_bytes()
        };
        let mut path = format!(
            "/v1/sandboxes/{}/files?path={}",
            enc(&p.sandbox),
            enc(&p.path)
        );
        if let Some(mode) = &p.mode {
            path.push_str(&format!("&mode={}", enc(mode)));
        }
        let r = attempt!(self.json("PUT", path, Body::Bytes(data)).await);
        ok(json!({"path": p.path, "written": r}))
    }

    #[tool(
        description = "List a directory in a sandbox: each entry's name, type (file, dir, symlink, ...), size and mode."
    )]
    async fn list_files(
        &self,
        Parameters(p): Parameters<FilePath>,
    ) -> Result<CallToolResult, ErrorData> {
        let r = attempt!(
            self.json(
                "GET",
                format!(
                    "/v1/sandboxes/{}/files/list?path={}",
                    enc(&p.sandbox),
                    enc(&p.path)
                ),
                Body::None
            )
            .await
        );
        ok(json!({"path": p.path, "entries": r}))
    }

    #[tool(
        description = "Checkpoint a sandbox: save its complete state (memory, running processes, disk) as a snapshot, then let it continue. Do this before a risky step; restore_snapshot rolls the sandbox back to this moment, resume_snapshot starts a new sandbox from it."
    )]
    async fn snapshot(
        &self,
        Parameters(p): Parameters<TakeSnapshot>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({});
        if let Some(name) = p.name {
            body["name"] = name.into();
        }
        let r = attempt!(
            self.json(
                "POST",
                format!("/v1/sandboxes/{}/snapshots", enc(&p.sandbox)),
                Body::Json(body)
            )
            .await
        );
        ok(snapshot_summary(&r))
    }

    #[tool(
        description = "Roll a sandbox back to a snapshot of it: the sandbox the snapshot was taken from returns to exactly that moment (memory, processes, files) and keeps running; everything done since is discarded. Use it to undo a step that went wrong; rolling back to the same snapshot again later works too."
    )]
    async fn restore_snapshot(
        &self,
        Parameters(p): Parameters<RestoreSnapshot>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = json!({"resume": true, "force": p.force.unwrap_or(true)});
        let path = format!("/v1/snapshots/{}/restore", enc(&p.snapshot));
        let restored = match self.json("POST", path, Body::Json(body)).await {
            Err(e) if e.code == "snapshot_in_use" => {
                // The source runs on this snapshot's memory since an earlier rollback to it, which a
                // plain restore refuses. Rewinding the source to it is the same rollback, done by the
                // daemon under the sandbox's lock: it finishes or leaves the source as it was (stopping
                // it first and retrying, as this did before, could leave it stopped).
                let snap = attempt!(
                    self.json(
                        "GET",
                        format!("/v1/snapshots/{}", enc(&p.snapshot)),
                        Body::None
                    )
                    .await
                );
                let source = snap["sandbox_id"].as_str().unwrap_or_default();
                self.json(
                    "POST",
                    format!("/v1/sandboxes/{}/rewind", enc(source)),
                    Body::Json(json!({ "to": snap["id"] })),
                )
                .await
            }
            other => other,
        };
        ok(sandbox_summary(&attempt!(restored)))
    }

    #[tool(
        description = "Start a NEW sandbox from a snapshot, running from the moment it was taken; the original sandbox is untouched. Returns the new sandbox."
    )]
    async fn resume_snapshot(
        &self,
        Parameters(p): Parameters<ResumeSnapshot>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({});
        if let Some(name) = p.name {
            body["name"] = name.into();
        }
        let r = attempt!(
            self.json(
                "POST",
                format!("/v1/snapshots/{}/resume", enc(&p.snapshot)),
                Body::Json(body)
            )
            .await
        );
        ok(sandbox_summary(&r))
    }

    #[tool(
        description = "Copy a running sandbox into new sandboxes that continue from its current state (same files and processes), e.g. to try several approaches in parallel. Returns the new sandboxes."
    )]
    async fn fork_sandbox(
        &self,
        Parameters(p): Parameters<Fork>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = json!({"count": p.count.unwrap_or(1)});
        let r = attempt!(
            self.json(
                "POST",
                format!("/v1/sandboxes/{}/fork", enc(&p.sandbox)),
                Body::Json(body)
            )
            .await
        );
        let list: Vec<Value> = r["sandboxes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(sandbox_summary)
            .collect();
        ok(json!({"sandboxes": list}))
    }

    #[tool(description = "List sandboxes and snapshots with their ids, names and states.")]
    async fn list(&self, Parameters(_): Parameters<Nothing>) -> Result<CallToolResult, ErrorData> {
        let sandboxes = attempt!(self.json("GET", "/v1/sandboxes".into(), Body::None).await);
        let snapshots = attempt!(self.json("GET", "/v1/snapshots".into(), Body::None).await);
        let sbs: Vec<Value> = sandboxes
            .as_array()
            .into_iter()
            .flatten()
            .map(sandbox_summary)
            .collect();
        let snaps: Vec<Value> = snapshots
            .as_array()
            .into_iter()
            .flatten()
            .map(snapshot_summary)
            .collect();
        ok(json!({"sandboxes": sbs, "snapshots": snaps}))
    }

    #[tool(
        description = "Delete a sandbox: its VM stops and its files are removed. Its snapshots stay (delete them with delete_snapshot)."
    )]
    async fn delete_sandbox(
        &self,
        Parameters(p): Parameters<SandboxRef>,
    ) -> Result<CallToolResult, ErrorData> {
        attempt!(
            self.daemon
                .request(
                    "DELETE",
                    format!("/v1/sandboxes/{}", enc(&p.sandbox)),
                    Body::None
                )
                .await
        );
        ok(json!({"deleted": p.sandbox}))
    }

    #[tool(description = "Delete a snapshot you no longer need, to free its disk space.")]
    async fn delete_snapshot(
        &self,
        Parameters(p): Parameters<SnapshotRef>,
    ) -> Result<CallToolResult, ErrorData> {
        let r = attempt!(
            self.json(
                "DELETE",
                format!("/v1/snapshots/{}", enc(&p.snapshot)),
                Body::None
            )
            .await
        );
        ok(json!({"deleted": p.snapshot, "result": r}))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Kiln {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kiln", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}
