//! Flow-insert rate of the driver against the simulator (running on its own thread,
//! monotonic clock): insert N flows in batches, reap all, delete them, repeat.
//! Prints a table and, last, one JSON line.
#![forbid(unsafe_code)]

use std::time::Instant;

use ctoffload_driver::device::{Device, DeviceConfig, FlowCommand};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_hw_regs::{FlowAction, FlowKey, L4Proto};
use ctoffload_nic_sim::{SimClock, SimConfig, Simulator};

const FLOWS: usize = 8192;
const REPEATS: usize = 7;

fn key(i: usize) -> FlowKey {
    let b = u32::try_from(i).unwrap_or(0).to_be_bytes();
    FlowKey::ipv4(
        0,
        L4Proto::Udp,
        0,
        [10, b[1], b[2], b[3]].into(),
        4000,
        [192, 0, 2, 1].into(),
        53,
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim = Simulator::new(SimConfig {
        buckets_log2: 14,
        flow_limit: 1 << 17,
        ..SimConfig::default()
    })?;
    let iommu = sim.iommu();
    let io = SimIo::new(
        sim.bar_fd(),
        Box::new(move |iova, fd, off, len| {
            iommu.map(iova, fd, off, len).map_err(|e| e.to_string())
        }),
        sim.irq_fds()?,
    )?;
    let th = sim.spawn(SimClock::Monotonic);
    let mut dev = Device::new(
        io,
        DeviceConfig {
            cmd_ring_log2: 10,
            ..DeviceConfig::default()
        },
    )?;
    let keys: Vec<FlowKey> = (0..FLOWS).map(key).collect();
    let action = FlowAction::forward(1);
    let mut json = vec![r#""bench":"driver_insert""#.to_string()];
    println!(
        "batch | inserts/s min | inserts/s median | mmio writes/insert | mmio reads/insert | doorbells/batch"
    );
    let mut out = Vec::with_capacity(FLOWS);
    let mut ids = Vec::with_capacity(FLOWS);
    for batch in [1usize, 8, 32, 128] {
        let mut rates = Vec::new();
        let (mut w, mut r, mut db, mut batches, mut inserts) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for _ in 0..REPEATS {
            let m0 = dev.mmio_stats();
            let s0 = th.stats();
            let t0 = Instant::now();
            ids.clear();
            let cmds: Vec<FlowCommand> = keys
                .iter()
                .map(|&k| FlowCommand::Insert { key: k, action })
                .collect();
            let mut at = 0;
            let mut nb = 0u64;
            while at < cmds.len() {
                let end = (at + batch).min(cmds.len());
                let s = dev.submit(&cmds[at..end])?;
                if s.accepted() > 0 {
                    nb += 1;
                }
                at += s.accepted();
                out.clear();
                dev.reap(&mut out)?;
                ids.extend(out.iter().filter_map(|x| x.flow_id));
            }
            while ids.len() < FLOWS {
                out.clear();
                dev.reap(&mut out)?;
                ids.extend(out.iter().filter_map(|x| x.flow_id));
            }
            let dt = t0.elapsed().as_secs_f64();
            let m1 = dev.mmio_stats();
            // Wait for the simulator's stats to catch up before reading them.
            std::thread::sleep(std::time::Duration::from_millis(2));
            let s1 = th.stats();
            rates.push(f64::from(u32::try_from(FLOWS).unwrap_or(0)) / dt);
            w += m1.writes - m0.writes;
            r += m1.reads - m0.reads;
            db += s1.cmd_doorbells - s0.cmd_doorbells;
            batches += nb;
            inserts += u64::try_from(FLOWS).unwrap_or(0);
            // Delete them all (not timed).
            let dels: Vec<FlowCommand> = ids
                .iter()
                .zip(&keys)
                .map(|(&flow_id, &key)| FlowCommand::Delete { flow_id, key })
                .collect();
            let res = dev.execute(&dels, std::time::Duration::from_secs(10))?;
            assert!(res.iter().all(|x| x.is_ok()), "delete failed");
        }
        rates.sort_by(f64::total_cmp);
        let (min, med) = (rates[0], rates[rates.len() / 2]);
        let f = |a: u64, b: u64| a as f64 / b as f64;
        let (wpi, rpi, dpb) = (f(w, inserts), f(r, inserts), f(db, batches));
        println!("{batch:5} | {min:13.0} | {med:16.0} | {wpi:18.3} | {rpi:17.3} | {dpb:15.3}");
        json.push(format!(r#""batch_{batch}_inserts_per_s":{med:.0}"#));
        json.push(format!(r#""batch_{batch}_inserts_per_s_min":{min:.0}"#));
        json.push(format!(
            r#""batch_{batch}_mmio_writes_per_insert":{wpi:.3}"#
        ));
        json.push(format!(r#""batch_{batch}_mmio_reads_per_insert":{rpi:.3}"#));
        json.push(format!(r#""batch_{batch}_doorbells_per_batch":{dpb:.3}"#));
    }
    drop(th.stop());
    println!("{{{}}}", json.join(","));
    Ok(())
}
