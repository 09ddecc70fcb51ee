//! Memory headroom: a machine created with `max_memory_mib` above its `memory_mib` has that much RAM and a
//! virtio balloon holding the difference, so a copy resumed from its snapshot can be given more memory
//! (`microvm` maps no memory device, so RAM cannot be added to a running guest any other way).
//!
//! The guest's `virtio_balloon` driver (a late module of every image) takes the pages QEMU asks for and
//! gives them up; QEMU discards them from the RAM file (a hole in a tmpfs file costs no host memory), and
//! without deflate-on-oom the guest lowers its MemTotal by what it gave. Deflating gives them back.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::{Error, ErrorCode, Result};
use crate::vm::Vm;

/// How long the guest may take to reach the balloon target: at create it first has to load its driver
/// (a late module, after the agent starts) and give up the pages, under TCG.
const DEADLINE: Duration = Duration::from_secs(60);

/// Sets the balloon so the guest has exactly `memory_mib` (the machine has more) and waits until it has
/// (QMP `query-balloon`). QEMU accepts a target only once the guest's driver is up (`DeviceNotActive`
/// before: at create the module loads after the agent starts), so the target is given until taken.
pub(crate) async fn settle(vm: &Vm, memory_mib: u64) -> Result<Duration> {
    let started = Instant::now();
    let qmp = vm.qmp().await?;
    let want = memory_mib << 20;
    let mut asked = false;
    let mut actual = 0;
    while started.elapsed() < DEADLINE {
        if !asked {
            match qmp.execute("balloon", Some(json!({ "value": want }))).await {
                Ok(_) => asked = true,
                Err(kiln_vmm::VmmError::QmpCommand { class, .. }) if class == "DeviceNotActive" => {
                }
                Err(e) => return Err(e.into()),
            }
        }
        if asked {
            actual = qmp.execute("query-balloon", None).await?["actual"]
                .as_u64()
                .unwrap_or(0);
            if actual == want {
                return Ok(started.elapsed());
            }
        }
        if !vm.is_alive() {
            return Err(vm.died_error());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(Error::new(
        ErrorCode::SandboxUnresponsive,
        format!(
            "the guest did not bring its memory to {memory_mib} MiB within {} s (it has {} MiB). Its image may lack the virtio_balloon module: rebuild it with `kiln image build NAME --force`, or create the sandbox without --max-memory",
            DEADLINE.as_secs(),
            actual >> 20
        ),
    ))
}
