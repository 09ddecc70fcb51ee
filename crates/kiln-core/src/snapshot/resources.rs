//! Resources of a copy resumed from a memory snapshot: which `memory_mib`/`cpus` it may ask for, and
//! bringing the guest's vCPUs to the count asked for.
//!
//! A saved machine loads only into the same device set, so what a copy can change is what existed from
//! boot: every machine is created with `max_cpus` vCPUs (`kiln serve --max-vcpus`) of which only `cpus`
//! are online in the guest, and a resume onlines or offlines them through the agent. Memory grows only
//! within headroom made at create (`max_memory_mib`, a virtio balloon: see `crate::balloon`): QEMU's
//! `microvm` maps no memory device (virtio-mem and pc-dimm get no address there, checked with QEMU
//! 10.0.2). A copy never has less than its snapshot's guest holds.

use std::time::Duration;

use super::manifest::Manifest;
use crate::error::{Error, ErrorCode, Result};
use crate::vm::{agent_error, Vm};

/// How long the guest may take to bring its vCPUs to the count asked for.
const CPU_DEADLINE: Duration = Duration::from_secs(20);

/// The memory and vCPUs a copy of memory snapshot `m` gets for a request asking `memory_mib`/`cpus`.
pub(crate) fn for_memory_snapshot(
    m: &Manifest,
    memory_mib: Option<u64>,
    cpus: Option<u32>,
) -> Result<(u64, u32)> {
    let refuse = |msg: String| Error::new(ErrorCode::ResourceOverrideRefused, msg);
    match memory_mib {
        Some(asked) if asked < m.memory_mib => {
            return Err(refuse(format!(
                "snapshot {} holds a running machine with {} MiB of memory in use by its guest; a copy cannot have less (asked for {asked} MiB). Resume it with {} MiB, or take a `--type disk` snapshot and resume that with less",
                m.id, m.memory_mib, m.memory_mib
            )))
        }
        Some(asked) if asked > m.max_memory_mib.unwrap_or(m.memory_mib) => {
            return Err(refuse(match m.max_memory_mib {
                Some(max) => format!(
                    "snapshot {} holds a running machine with {} MiB of memory and room to grow to {max} MiB; asked for {asked} MiB. Ask for at most {max} MiB, or create the sandbox with a larger --max-memory (or take a `--type disk` snapshot and resume that with more)",
                    m.id, m.memory_mib
                ),
                None => format!(
                    "snapshot {} holds a running machine with {} MiB of memory and no room to grow (its sandbox was created without headroom: `max_memory_mib` equal to its memory, `kiln serve --memory-headroom 1`, an image without the balloon driver, or an older kiln), so a copy keeps {} MiB (asked for {asked} MiB). Create the sandbox with --max-memory {asked} to resume copies with more, or take a `--type disk` snapshot and resume that with more memory",
                    m.id, m.memory_mib, m.memory_mib
                ),
            }))
        }
        _ => {}
    }
    let memory = memory_mib.unwrap_or(m.memory_mib);
    let Some(asked) = cpus.filter(|c| *c != m.cpus) else {
        return Ok((memory, m.cpus));
    };
    let max = m.max_cpus.unwrap_or(m.cpus);
    if asked == 0 || asked > max {
        let why = if max == m.cpus {
            format!(
                "its machine has exactly {max} vCPUs (it was made before spare vCPUs existed, or with `kiln serve --max-vcpus {max}`)"
            )
        } else {
            format!("its machine has {max} vCPUs, {} of them online", m.cpus)
        };
        return Err(refuse(format!(
            "snapshot {} cannot resume with {asked} vCPUs: {why}. Ask for 1 to {max}, or take a `--type disk` snapshot and resume that with {asked}",
            m.id
        )));
    }
    Ok((memory, asked))
}

/// Parses a kernel CPU list (`0-2,4`) into CPU numbers.
pub(crate) fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Brings the guest to exactly `cpus` online vCPUs (0..cpus) of the `max` its machine has, through the
/// agent (`/sys/devices/system/cpu/cpuN/online`), and checks that the guest reports them.
pub(crate) async fn set_online_cpus(vm: &Vm, cpus: u32, max: u32) -> Result<()> {
    let work = async {
        let agent = vm.agent(Duration::from_secs(20)).await?;
        let named = |e| agent_error(e, &vm.name);
        let online = || async {
            let raw = agent
                .read_file_to_vec("/sys/devices/system/cpu/online")
                .await
                .map_err(named)?;
            parse_cpu_list(&String::from_utf8_lossy(&raw)).ok_or_else(|| {
                Error::new(
                    ErrorCode::GuestError,
                    "the guest's /sys/devices/system/cpu/online is not a CPU list",
                )
            })
        };
        let now = online().await?;
        // cpu0 cannot go offline; add before removing, so the guest always has the most it will keep.
        for n in (1..max).filter(|n| *n < cpus && !now.contains(n)) {
            agent
                .append_file(&format!("/sys/devices/system/cpu/cpu{n}/online"), b"1")
                .await
                .map_err(named)?;
        }
        for n in (1..max).filter(|n| *n >= cpus && now.contains(n)) {
            agent
                .append_file(&format!("/sys/devices/system/cpu/cpu{n}/online"), b"0")
                .await
                .map_err(named)?;
        }
        let after = online().await?;
        let want: Vec<u32> = (0..cpus).collect();
        if after != want {
            return Err(Error::new(
                ErrorCode::GuestError,
                format!("the guest has vCPUs {after:?} online after kiln asked for {want:?}"),
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(CPU_DEADLINE, work).await {
        Ok(r) => r.map_err(|e| {
            Error::new(
                e.code,
                format!("bringing the guest to {cpus} vCPUs failed: {}", e.message),
            )
        }),
        Err(_) => Err(Error::new(
            ErrorCode::SandboxUnresponsive,
            format!(
                "the guest did not bring {cpus} vCPUs online within {} s",
                CPU_DEADLINE.as_secs()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(cpus: u32, max: Option<u32>) -> Manifest {
        let dir = tempfile::tempdir().unwrap();
        let mut m = crate::snapshot::manifest::tests::sample(dir.path());
        m.memory_mib = 256;
        m.cpus = cpus;
        m.max_cpus = max;
        m
    }

    #[test]
    fn vcpus_change_within_the_machine_and_memory_never_shrinks() {
        let m = manifest(1, Some(4));
        assert_eq!(for_memory_snapshot(&m, None, None).unwrap(), (256, 1));
        assert_eq!(
            for_memory_snapshot(&m, Some(256), Some(4)).unwrap(),
            (256, 4)
        );
        let m2 = manifest(2, Some(2));
        assert_eq!(for_memory_snapshot(&m2, None, Some(1)).unwrap(), (256, 1));
        for (mem, cpus) in [(Some(128), None), (Some(512), None), (None, Some(5))] {
            let e = for_memory_snapshot(&m, mem, cpus).unwrap_err();
            assert_eq!(e.code, ErrorCode::ResourceOverrideRefused, "{e}");
            assert!(e.message.contains("--type disk"), "{e}");
        }
        assert!(for_memory_snapshot(&m, Some(128), None)
            .unwrap_err()
            .message
            .contains("cannot have less"));
    }

    #[test]
    fn memory_grows_within_the_headroom_only() {
        let mut m = manifest(1, Some(2));
        m.max_memory_mib = Some(512);
        assert_eq!(
            for_memory_snapshot(&m, Some(512), Some(2)).unwrap(),
            (512, 2)
        );
        assert_eq!(for_memory_snapshot(&m, Some(300), None).unwrap(), (300, 1));
        let above = for_memory_snapshot(&m, Some(513), None).unwrap_err();
        assert_eq!(above.code, ErrorCode::ResourceOverrideRefused);
        assert!(above.message.contains("at most 512 MiB"), "{above}");
        assert!(above.message.contains("--max-memory"), "{above}");
        let less = for_memory_snapshot(&m, Some(128), None).unwrap_err();
        assert!(less.message.contains("cannot have less"), "{less}");
        // Without headroom: the message says how to get some.
        let plain = manifest(1, Some(2));
        let e = for_memory_snapshot(&plain, Some(512), None).unwrap_err();
        assert!(e.message.contains("--max-memory 512"), "{e}");
    }

    #[test]
    fn machines_without_spare_vcpus_keep_their_own() {
        // Its vCPUs exist, so fewer of them can be online; none can be added.
        let old = manifest(2, None);
        assert_eq!(for_memory_snapshot(&old, None, Some(1)).unwrap(), (256, 1));
        let e = for_memory_snapshot(&old, None, Some(3)).unwrap_err();
        assert_eq!(e.code, ErrorCode::ResourceOverrideRefused);
        assert!(e.message.contains("exactly 2 vCPUs"), "{e}");
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-2,4"), Some(vec![0, 1, 2, 4]));
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }
}
