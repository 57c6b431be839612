# Sourced by every template in examples/slurm/ (not a job of its own): where the code is, with or
# without a container, and the srun options that follow from it. After `mu_setup`:
#   WORK       the working directory of every step (default: where sbatch was called, $SLURM_SUBMIT_DIR)
#   SRC        the repository (recipes under $SRC/examples/recipes)
#   MU_SRUN    srun options for the container ((): none)
# Each template finds this file beside itself first: sbatch runs a copy of the script from its spool
# directory, so inside a job the original path comes from the job record (`Command=`).
#
# Container or not (IMAGE):
#   unset      $WORK/megatron-ultralong.sqsh if that file exists (pyxis/enroot; train.sbatch's header
#              shows how to build it from the repo's Dockerfile), else no container
#   a path     that image; a path that does not exist is an error, not a silent fallback
#   a name     a registry reference pyxis pulls (nvcr.io#..., docker://...)
#   none, ""   no container: the code runs from the environment sbatch was called from
# With a container, SRC is /opt/megatron-ultralong (where the Dockerfile installs it) and $WORK is
# mounted at the same path. Without one, SRC is the clone these templates live in, put first on
# PYTHONPATH so the code matches the recipes; the Python environment is the one sbatch passes on
# (`sbatch --export=ALL`, Slurm's default): activate the virtualenv or `module load` first, or set
# VENV=/path/to/venv and the job activates it on the node.

mu_setup() {
  local here=$1
  WORK=${WORK:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [ -z "${IMAGE+set}" ]; then
    IMAGE=$WORK/megatron-ultralong.sqsh
    [ -f "$IMAGE" ] || IMAGE=none
  fi
  case "${IMAGE:-none}" in
    none) IMAGE=none ;;
    /* | ./* | ../* | *.sqsh)
      if [ ! -e "$IMAGE" ]; then
        echo "IMAGE=$IMAGE: no such image (IMAGE=none runs without a container)" >&2
        exit 2
      fi ;;
  esac
  if [ "$IMAGE" = none ]; then
    MU_SRUN=()
    SRC=${SRC:-$(cd "$here/../.." && pwd)}
    if [ -n "${VENV:-}" ]; then
      # shellcheck disable=SC1091
      source "$VENV/bin/activate"
    fi
    export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
    echo "[$(date)] no container; SRC=$SRC, python: $(command -v python || echo none)"
  else
    MU_SRUN=(--container-image="$IMAGE" --container-mounts="$WORK:$WORK" --container-workdir="$WORK"
             --no-container-mount-home)
    SRC=${SRC:-/opt/megatron-ultralong}
    echo "[$(date)] container $IMAGE; SRC=$SRC"
  fi
  # PyTorch's allocator: expandable segments avoid the fragmentation that million-token activations
  # of changing sizes leave behind (https://pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf).
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  export TOKENIZERS_PARALLELISM=false
  cd "$WORK" || exit 2
}
