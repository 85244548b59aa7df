import json, glob, os, sys
d = sys.argv[1]
keys = ['conns_1k_cpu_mpps','conns_100k_cpu_mpps','conns_1m_cpu_mpps','conns_1k_mpps','conns_100k_mpps','conns_1m_mpps','new_udp_cpu_per_s','new_udp_per_s','tcp_handshakes_cpu_per_s','tcp_handshakes_per_s','snat_cpu_ratio_1k','snat_cpu_ratio_100k','snat_cpu_ratio_1m','snat_ratio_1k','snat_ratio_100k','snat_ratio_1m','new_snat_busy90_cpu_per_s','new_snat_busy90_per_s','new_plain_busy90_cpu_per_s','new_plain_busy90_per_s','thp','bytes_per_conn','bytes_per_conn_snat','reconcile_pass_ticks_active_cpu_ms_min','reconcile_pass_ticks_active_cpu_ms_median','reconcile_pass_ticks_cpu_ms_min','reconcile_pass_ticks_cpu_ms_median','reconcile_full_cpu_ms_median','conns_per_s','offload_p50_us','single_offload_p50_us']
out = {}
for f in sorted(glob.glob(d + '/*.log')):
    l = open(f).read().strip().split('\n')[-1]
    try:
        j = json.loads(l)
    except Exception:
        out[os.path.basename(f)] = 'ERR ' + l[:200]
        continue
    out[os.path.basename(f)] = {k: j[k] for k in keys if k in j}
json.dump(out, open(os.environ['OUT'] + '/summary.json', 'w'), indent=0)
