# shellcheck shell=bash
# Environment for a distributed gdn2-pretrain run; sourced by launch/torchrun.sh and slurm/*.sbatch.
#
# Every variable below is a default: a value already set in the environment (exported before
# sbatch/torchrun, or in the sbatch script) is kept as is. Set a variable to an empty string to
# leave it unset for NCCL/torch (NCCL_IB_TIMEOUT= keeps NCCL's own default).
#
# NCCL, for H100 nodes on InfiniBand (NDR, GPUDirect RDMA). NCCL detects HCAs and the topology
# by itself; these change only what large jobs need:
#   NCCL_DEBUG=WARN                    INFO when debugging a hang or slow start (very verbose)
#   NCCL_IB_TIMEOUT=22                 IB retransmission timeout 4.096us * 2^22 ~ 17 s (NCCL default
#                                      20, ~4 s): fewer "retry count exceeded" aborts under congestion
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1  frees communication buffers without recordStream: less memory
#   CUDA_DEVICE_MAX_CONNECTIONS=1      one hardware queue, so Megatron's TP/SP communication is
#                                      issued in program order (needed for its overlap)
# Not set, only passed through (site-specific; set them in the environment when needed):
#   NCCL_NVLS_ENABLE   0 disables NVLink SHARP / multicast (VMs, some containers and drivers lack it)
#   NCCL_SOCKET_IFNAME interface for NCCL's bootstrap, e.g. =ib0 or ^docker,lo when it picks a wrong one
#   NCCL_IB_HCA        which HCAs to use, e.g. =mlx5_0,mlx5_1 (default: all)
#   NCCL_IB_GID_INDEX  RoCE only (e.g. 3); NCCL_IB_SL, NCCL_IB_TC: as your fabric admin says
#
# Triton: TRITON_CACHE_DIR defaults to a per-job directory on node-local disk
# ($TRITON_CACHE_ROOT, default /tmp): a cache shared over NFS by many ranks is slow and racy.

gdn2_default() { # name value: export name=value unless name is already set (even to "")
  if [ -z "${!1+x}" ]; then export "$1=$2"; fi
}

gdn2_default NCCL_DEBUG WARN
gdn2_default NCCL_IB_TIMEOUT 22
gdn2_default TORCH_NCCL_AVOID_RECORD_STREAMS 1
gdn2_default CUDA_DEVICE_MAX_CONNECTIONS 1
gdn2_default TRITON_CACHE_DIR "${TRITON_CACHE_ROOT:-/tmp}/gdn2-triton-${USER:-$(id -un)}-${SLURM_JOB_ID:-$$}"
gdn2_default PYTHONUNBUFFERED 1

# An empty value means "leave it to the library": unset it so it does not read "".
for _gdn2_var in NCCL_DEBUG NCCL_IB_TIMEOUT TORCH_NCCL_AVOID_RECORD_STREAMS CUDA_DEVICE_MAX_CONNECTIONS; do
  if [ -z "${!_gdn2_var}" ]; then unset "$_gdn2_var"; fi
done
unset _gdn2_var

gdn2_print_env() { # the settings a run used, for its log
  env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_DEVICE_MAX_CONNECTIONS|TRITON_CACHE_DIR|OMP_NUM_THREADS|MASTER_)' \
    | sort | sed 's/^/  /'
}
