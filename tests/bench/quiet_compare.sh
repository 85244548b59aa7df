#!/bin/bash
# Quiet-core comparison of a base and a new build, run side by side on a many-core
# machine (docs/benchmarks.md, "Quiet 16-core runs after the afternoon merges").
# Put next to it: conntrack-{base,new} (the conntrack bench executables, `cargo bench
# -p ctoffload-fallback-sw --bench conntrack --no-run`), dataplane_bench-{base,new}
# (`cargo build --release -p ctoffload-agent --bin dataplane_bench`); OUT names the
# folder for the summary (summary.json and the first runs' tables).
set -u
cd "$(dirname "$0")"
FINAL=${OUT:-/tmp/final}; OUT=/tmp/out; rm -rf $OUT; mkdir -p "$OUT" "$FINAL"
echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"; nproc; uptime
lscpu | grep -E "^(Model name|Thread|Core|Socket)" 
# one CPU per physical core
mapfile -t P < <(for c in /sys/devices/system/cpu/cpu[0-9]*; do cat $c/topology/thread_siblings_list; done | sort -u -t, -k1,1n | sed 's/[,-].*//' | sort -n | uniq)
sib() { cat /sys/devices/system/cpu/cpu$1/topology/thread_siblings_list; }
echo "cores: ${P[*]}"
T=420
# (a full run is about 45 s): on each of four cores base and new alternate, 2 runs each
for i in 1 2 3 4; do
  c=${P[$i]}
  (for r in 1 2; do
     if [ $(( (i + r) % 2 )) = 0 ]; then order="base new"; else order="new base"; fi
     for b in $order; do timeout 200 taskset -c $c ./conntrack-$b --bench > $OUT/ct_${b}_c${i}_r$r.log 2>&1; done
   done) &
done
# new with glibc huge pages, established only
(for r in 1 2 3; do
   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 CT_BENCH_ONLY=est timeout 120 taskset -c ${P[5]} ./conntrack-new --bench > $OUT/ct_est_thp_r$r.log 2>&1
   CT_BENCH_ONLY=est timeout 120 taskset -c ${P[5]} ./conntrack-new --bench > $OUT/ct_est_nothp_r$r.log 2>&1
 done) &
# dataplane: each on both threads of one core (worker + simulator thread)
if [ -x ./dataplane_bench-new ]; then
  if [ ${#P[@]} -ge 10 ]; then cb=${P[6]},${P[7]}; cn=${P[8]},${P[9]}; else cb=$(sib ${P[6]}); cn=$(sib ${P[7]}); fi
  echo "dataplane cpus: base $cb new $cn"
  (for r in 1 2 3; do timeout 150 taskset -c $cb ./dataplane_bench-base 2000 1000000 > $OUT/dp_base_r$r.log 2>&1; done) &
  (for r in 1 2 3; do timeout 150 taskset -c $cn ./dataplane_bench-new 2000 1000000 > $OUT/dp_new_r$r.log 2>&1; done) &
fi
wait
OUT=$FINAL python3 quiet_compare_summary.py /tmp/out
for f in ct_new_c1_r1 ct_base_c1_r1 dp_new_r1 dp_base_r1; do grep -v "^{" /tmp/out/$f.log > $FINAL/$f.txt; done
ls $FINAL
