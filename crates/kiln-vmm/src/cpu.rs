//! The CPU a guest sees: the model kiln passes (`-cpu`), the feature flags QEMU expands it to on this host
//! and the CPU's identity (vendor/family/model/stepping, physical address bits, TSC frequency and whether
//! KVM can scale the TSC). Recorded in snapshots and compared on restore: a guest that saw a feature at
//! boot may use it at any time, so a host whose QEMU lacks it cannot continue that guest.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::accel::Accel;
use crate::error::VmmError;

/// Nested virtualization and the PMU stay hidden from guests under KVM: neither migrates reliably
/// between hosts, and a guest hypervisor or perf counters are not what a sandbox is for.
pub const HIDDEN: &str = "vmx=off,svm=off,pmu=off";

static MODEL_OVERRIDE: OnceLock<String> = OnceLock::new();

/// Sets the named CPU model (`kiln serve --cpu-model`) once, before any VM starts: a fleet whose snapshots
/// travel between hosts gives every host the same model instead of `host`.
pub fn set_model_override(name: &str) -> Result<(), String> {
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "invalid CPU model '{name}': give a QEMU model name such as EPYC-v4 or Skylake-Server-v4 (`qemu-system-x86_64 -cpu help` lists them)"
        ));
    }
    MODEL_OVERRIDE
        .set(name.to_string())
        .map_err(|_| "the CPU model was already set".to_string())
}

/// The `-cpu` value kiln runs guests with under `accel`. Plain `max` under TCG (what every TCG snapshot
/// so far recorded); `host` or the named model with [`HIDDEN`] otherwise.
pub fn model(accel: Accel) -> String {
    model_with(accel, MODEL_OVERRIDE.get().map(String::as_str))
}

fn model_with(accel: Accel, named: Option<&str>) -> String {
    match (accel, named) {
        (Accel::Tcg, None) => "max".to_string(),
        (Accel::Kvm, None) => format!("host,{HIDDEN}"),
        // `enforce`: QEMU refuses to start when this host cannot give the guest every feature of the model.
        (Accel::Kvm, Some(n)) => format!("{n},{HIDDEN},enforce"),
        (Accel::Tcg, Some(n)) => format!("{n},{HIDDEN}"),
    }
}

/// A `-cpu` value as QMP's CpuModelInfo: the name and its `on`/`off` properties.
fn model_info(cpu: &str) -> Value {
    let mut parts = cpu.split(',');
    let name = parts.next().unwrap_or("max");
    let mut props = serde_json::Map::new();
    for p in parts {
        match p.split_once('=') {
            Some((k, "on")) => props.insert(k.into(), Value::Bool(true)),
            Some((k, "off")) => props.insert(k.into(), Value::Bool(false)),
            Some((k, v)) => props.insert(k.into(), Value::String(v.into())),
            None => props.insert(p.into(), Value::Bool(true)),
        };
    }
    json!({ "name": name, "props": props })
}

/// Who the guest's CPU says it is, and the clock it ticks at.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub vendor: String,
    pub family: u64,
    pub model: u64,
    pub stepping: u64,
    /// Guest physical address bits.
    pub phys_bits: u64,
    /// The guest TSC's frequency; None where QEMU does not fix one (TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u64>,
    /// Whether KVM can run a guest TSC at another frequency than the host's (`KVM_CAP_TSC_CONTROL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_scaling: Option<bool>,
}

#[derive(Clone)]
struct Probed {
    features: Vec<String>,
    identity: Option<Identity>,
}

static CACHE: Mutex<Vec<(Accel, Probed)>> = Mutex::new(Vec::new());

fn cached(accel: Accel) -> Option<Probed> {
    let cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .iter()
        .find(|(a, _)| *a == accel)
        .map(|(_, p)| p.clone())
}

/// The feature flags of [`model`] on this host, if [`probe_features`] has found them.
pub fn features(accel: Accel) -> Option<Vec<String>> {
    cached(accel).map(|p| p.features)
}

/// The CPU identity of [`model`] on this host, if [`probe_features`] has found it.
pub fn identity(accel: Accel) -> Option<Identity> {
    cached(accel).and_then(|p| p.identity)
}

/// `KVM_CHECK_EXTENSION(KVM_CAP_TSC_CONTROL)` on the host's `/dev/kvm`.
pub fn kvm_tsc_scaling() -> Option<bool> {
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
    const KVM_CAP_TSC_CONTROL: libc::c_ulong = 60;
    let f = crate::accel::open_kvm().ok()?;
    // SAFETY: an ioctl on an open /dev/kvm descriptor with an integer argument.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            KVM_CHECK_EXTENSION,
            KVM_CAP_TSC_CONTROL,
        )
    };
    (r >= 0).then_some(r > 0)
}

/// Asks QEMU (a throwaway `microvm` with its vCPU never started, ~0.2 s) which boolean CPU properties are
/// on for [`model`] (QMP `query-cpu-model-expansion`, type `full`) and what the created vCPU reports
/// (vendor, family, model, stepping, phys-bits, tsc-frequency), and caches them. Blocking.
pub fn probe_features(accel: Accel) -> Result<Vec<String>, VmmError> {
    if let Some(p) = cached(accel) {
        return Ok(p.features);
    }
    let cpu = model(accel);
    let mut cmd = Command::new(crate::qemu_binary());
    cmd.args(accel.qemu_args())
        .args(["-M", &crate::qemu::machine(accel), "-cpu", &cpu, "-m", "16"])
        .args(["-object", "memory-backend-ram,id=mem,size=16M"])
        .args(["-nodefaults", "-display", "none", "-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let kvm = crate::accel::attach_kvm(&mut cmd, accel)
        .map_err(|e| VmmError::io("opening /dev/kvm to list CPU features", e))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| VmmError::io("starting QEMU to list CPU features", e))?;
    drop(kvm);
    let mut cmds = vec![
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "query-cpu-model-expansion",
               "arguments": {"type": "full", "model": model_info(&cpu)}}),
    ];
    const PROPS: [&str; 6] = [
        "vendor",
        "family",
        "model",
        "stepping",
        "phys-bits",
        "tsc-frequency",
    ];
    for p in PROPS {
        cmds.push(json!({"execute": "qom-get", "id": p,
            "arguments": {"path": "/machine/unattached/device[0]", "property": p}}));
    }
    cmds.push(json!({"execute": "quit"}));
    let text: String = cmds.iter().map(|c| format!("{c}\n")).collect();
    let written = child.stdin.take().map(|mut s| s.write_all(text.as_bytes()));
    let stdout = child.stdout.take();
    // Bounded: a QEMU that never answers is killed after the deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reader = std::thread::spawn(move || {
        let mut found = None;
        let mut props = serde_json::Map::new();
        for line in BufReader::new(stdout?).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).ok()?;
            if let Some(model_props) = v["return"]["model"]["props"].as_object() {
                let mut on: Vec<String> = model_props
                    .iter()
                    .filter(|(_, v)| v.as_bool() == Some(true))
                    .map(|(k, _)| k.clone())
                    .collect();
                on.sort();
                found = Some(on);
            } else if let (Some(id), Some(ret)) = (v["id"].as_str(), v.get("return")) {
                props.insert(id.to_string(), ret.clone());
            }
        }
        found.map(|f| (f, props))
    });
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let found = reader.join().ok().flatten();
    match (written, found) {
        (Some(Ok(())), Some((features, props))) => {
            let identity = identity_from(&props, accel);
            CACHE.lock().unwrap_or_else(|p| p.into_inner()).push((
                accel,
                Probed {
                    features: features.clone(),
                    identity,
                },
            ));
            Ok(features)
        }
        _ => Err(VmmError::LaunchFailed {
            detail: format!("QEMU did not list the features of CPU model '{cpu}'"),
        }),
    }
}

fn identity_from(props: &serde_json::Map<String, Value>, accel: Accel) -> Option<Identity> {
    let num = |k: &str| props.get(k).and_then(Value::as_u64);
    Some(Identity {
        vendor: props.get("vendor")?.as_str()?.to_string(),
        family: num("family")?,
        model: num("model")?,
        stepping: num("stepping")?,
        phys_bits: num("phys-bits")?,
        tsc_khz: num("tsc-frequency")
            .filter(|&hz| hz > 0)
            .map(|hz| hz / 1000),
        tsc_scaling: match accel {
            Accel::Kvm => kvm_tsc_scaling(),
            Accel::Tcg => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_max_lists_features_and_identity() {
        if Command::new(crate::qemu_binary())
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("QEMU not installed; skipped");
            return;
        }
        let f = probe_features(Accel::Tcg).expect("QEMU lists the features of -cpu max");
        assert!(f.iter().any(|x| x == "sse2"), "{f:?}");
        assert!(f.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(features(Accel::Tcg), Some(f));
        let id = identity(Accel::Tcg).expect("identity");
        assert!(!id.vendor.is_empty() && id.phys_bits > 0, "{id:?}");
        // TCG fixes no TSC frequency and has no KVM scaling.
        assert_eq!((id.tsc_khz, id.tsc_scaling), (None, None));
    }

    #[test]
    fn models_per_accelerator_hide_nested_virtualization_and_the_pmu_under_kvm() {
        assert_eq!(model_with(Accel::Tcg, None), "max");
        assert_eq!(model_with(Accel::Kvm, None), "host,vmx=off,svm=off,pmu=off");
        assert_eq!(
            model_with(Accel::Kvm, Some("EPYC-v4")),
            "EPYC-v4,vmx=off,svm=off,pmu=off,enforce"
        );
        assert_eq!(
            model_info("host,vmx=off,svm=off,pmu=off"),
            json!({"name": "host", "props": {"vmx": false, "svm": false, "pmu": false}})
        );
        assert!(set_model_override("EPYC;rm").is_err());
    }
}
