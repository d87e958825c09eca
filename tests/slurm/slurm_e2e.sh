#!/usr/bin/env bash
# End-to-end test of scripts/slurm/{train,sweep}.sbatch against a real single-node Slurm that this
# script starts on localhost (munged, slurmctld, slurmd; generated slurm.conf in a temp dir, free
# ports, no cgroups) and always stops. Exit 0 pass, 1 fail, 77 skipped (Slurm or munge missing or
# unable to start here; the reason is printed).
#
# Usage: slurm_e2e.sh RESYNC_BINARY REPO_DIR SCENARIO
#   train_sweep  train.sbatch (2 ranks) and a sweep.sbatch array over 1 and 2 ranks
#   preempt      train.sbatch gets the batch-shell SIGUSR1 of --signal=B:USR1@120: checkpoint,
#                requeue, and the requeued run resumes to the end
#   death        a rank of train.sbatch's srun step is SIGKILLed: the survivor saves, resync
#                launch starts a new srun step in the same allocation, which resumes to the end
set -uo pipefail

RESYNC=${1:?usage: slurm_e2e.sh RESYNC_BINARY REPO_DIR SCENARIO}
REPO=${2:?usage: slurm_e2e.sh RESYNC_BINARY REPO_DIR SCENARIO}
SCENARIO=${3:?usage: slurm_e2e.sh RESYNC_BINARY REPO_DIR SCENARIO}
if [[ $SCENARIO != train_sweep && $SCENARIO != preempt && $SCENARIO != death ]]; then
  echo "unknown scenario $SCENARIO" >&2
  exit 2
fi
# Absolute paths: the jobs run from a directory of their own.
REPO=$(cd "$REPO" && pwd) || exit 2
[[ $RESYNC == /* ]] || RESYNC="$PWD/$RESYNC"
START_TIMEOUT_S=30   # daemons up and the node idle
# Every submitted job finished (one budget per scenario; ctest allows 360). A requeued job waits
# CRED_EXPIRE_S + 1 s before it may start again (see slurm.conf below); the rest is margin for a
# loaded machine.
JOB_TIMEOUT_S=280
# Job credential lifetime of the private Slurm (slurm.conf AuthInfo=cred_expire; Slurm's minimum
# is 5, its default 120). slurmctld holds a requeued job back for this + 1 s, see below.
CRED_EXPIRE_S=10

skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAIL: $*" >&2; dump_logs; exit 1; }

for tool in munged slurmctld slurmd sbatch squeue scontrol scancel sinfo srun python3; do
  command -v "$tool" >/dev/null || skip "$tool not installed (Debian: slurm-wlm munge)"
done
[[ $(id -u) -eq 0 ]] || skip "starting slurmd needs root (SlurmdUser=root)"

TMP=$(mktemp -d /tmp/resync_slurm.XXXXXX)
chmod 755 "$TMP"
pids=()
dump_logs() {
  for log in "$TMP"/log/*.log "$TMP"/results/*.out "$TMP"/results/*/*.log; do
    [[ -f $log ]] || continue
    echo "---- $log (last 30 lines)" >&2
    tail -n 30 "$log" >&2
  done
}
cleanup() {
  # Jobs first (their steps are children of slurmd), then the daemons, newest first.
  if [[ -n ${SLURM_CONF:-} ]] && [[ ${#pids[@]} -gt 0 ]]; then
    scancel --quiet --full --user=root >/dev/null 2>&1 || true
    for _ in $(seq 50); do  # bounded: slurmd ends the steps' processes before it goes
      [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  for (( i=${#pids[@]}-1; i>=0; i-- )); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # bounded
    kill -KILL "$pid" 2>/dev/null || true
  done
  [[ -n ${RESYNC_SLURM_KEEP:-} ]] && echo "slurm: kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

mkdir -p "$TMP"/{munge,state,spool,log,results,tmp}
chmod 700 "$TMP/munge"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# munge: its own key, socket and files, so the machine's munge (if any) is left alone.
dd if=/dev/urandom of="$TMP/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$TMP/munge/munge.key"
MUNGE_SOCKET="$TMP/munge/munge.socket"
munged --force --key-file="$TMP/munge/munge.key" --socket="$MUNGE_SOCKET" \
  --pid-file="$TMP/munge/munged.pid" --log-file="$TMP/log/munged.log" \
  --seed-file="$TMP/munge/munged.seed" --foreground >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done  # bounded start-up poll
[[ -S $MUNGE_SOCKET ]] ||
  skip "munged did not start: $(tail -n 3 "$TMP/log/munged.log" 2>/dev/null)"

ncpus=$(nproc)
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
# Job ids (and so srun's PMIx directories) of their own, in case another such test runs at once.
first_job_id=$(( (RANDOM % 9000 + 1000) * 100 ))
export SLURM_CONF="$TMP/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=resynctest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: when a job is requeued, slurmd revokes the job's credential as of the second of
# the requeue and refuses any launch credential of that job stamped no later than that second
# ("Job credential revoked"; slurmctld then kills the job as non-startable). slurmctld guards
# against that by giving the requeued job a begin time of cred_expire + 1 s after the requeue;
# the default lifetime (120 s) would make the preemption scenario wait two minutes, so it is
# shortened here instead of overriding the begin time (which loses that guard).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE_S
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
TmpFS=$TMP/tmp
FirstJobId=$first_job_id
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Scan pending jobs every second: a requeued job must not wait for the default 60 s main loop
# or 30 s backfill pass (the preemption scenario requeues and waits for the resumed run).
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName=localhost CPUs=$ncpus RealMemory=1024 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

slurmctld -D -i -f "$SLURM_CONF" >"$TMP/log/slurmctld.stdout" 2>&1 &
pids+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" >"$TMP/log/slurmd.stdout" 2>&1 &
pids+=($!)

# Bounded poll for the node to register and become schedulable.
state=""
for _ in $(seq $((START_TIMEOUT_S * 5))); do
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || skip "a Slurm daemon exited at start-up:" \
      "$(tail -n 5 "$TMP"/log/slurm*.log "$TMP"/log/*.stdout 2>/dev/null | tr '\n' ' ')"
  done
  state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n 1)
  [[ $state == idle ]] && break
  sleep 0.2
done
[[ $state == idle ]] ||
  skip "the Slurm node did not become idle within ${START_TIMEOUT_S}s (state '$state'):" \
  "$(tail -n 5 "$TMP"/log/slurmd.log "$TMP"/log/slurmctld.log 2>/dev/null | tr '\n' ' ')"
echo "slurm: slurmctld :$ctld_port and slurmd :$slurmd_port up, node localhost ($ncpus CPUs) idle"

# Which PMI flavour srun offers; the sbatch files default to pmix.
mpi_plugins=$(srun --mpi=list 2>&1 | tr '\n' ' ')
echo "slurm: srun --mpi=list: $mpi_plugins"
[[ $mpi_plugins == *pmix* ]] || fail "srun offers no pmix plugin: $mpi_plugins"

# Jobs run as root from a directory of their own; sbatch passes this environment on.
export RESYNC
export OMPI_MCA_btl=self,vader,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
export OMPI_MCA_btl_vader_single_copy_mechanism=none
QUICK=(--data synthetic --synthetic-train 2000 --synthetic-test 500 --hidden 32 --batch-size 32
       --log-level warn)
cd "$TMP/results" || fail "cannot enter $TMP/results"

job_exit() {  # the final state and exit code of a job (array element NNN_i), from slurmctld
  scontrol -o show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]* .*ExitCode=[0-9:]*' |
    sed -E 's/JobState=([A-Z_]+).*ExitCode=([0-9:]+)/\1 \2/'
}
check_job() {
  local got
  got=$(job_exit "$1")
  [[ $got == "COMPLETED 0:0" ]] || fail "job $1 ended '$got', expected 'COMPLETED 0:0'"
}
check_summary() {  # FILE STEPS
  python3 - "$1" "$2" <<'PY' || fail "metrics file $1 does not hold the expected summary"
import json, sys
path, steps = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(path) if l.strip()]
s = rows[-1] if rows else {}
problems = []
if s.get("event") != "summary": problems.append(f"last record is not a summary: {s}")
if s.get("steps") != steps: problems.append(f"steps {s.get('steps')}, expected {steps}")
if s.get("ranks_agree") is not True: problems.append(f"ranks_agree {s.get('ranks_agree')}")
for p in problems: print(f"{path}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}

wait_for_queue_empty() {
  # Bounded poll until every job has left the queue (squeue asks slurmctld; nothing sleep-syncs).
  while [[ -n $(squeue -h -o '%i' 2>/dev/null) ]]; do
    if (( SECONDS >= job_deadline )); then
      squeue >&2
      fail "jobs still queued or running after ${JOB_TIMEOUT_S}s"
    fi
    sleep 0.5
  done
}

scenario_train_sweep() {
  job_deadline=$((SECONDS + JOB_TIMEOUT_S))
  # 1. A training run: 2 ranks on the one node, a short time limit, the file's own signal/requeue.
  train_dir="$TMP/results/train"
  train_job=$(RESULTS_DIR="$train_dir" sbatch --parsable --nodes=1 --ntasks-per-node=2 \
    --time=00:03:00 --output="$TMP/results/train-%j.out" \
    "$REPO/scripts/slurm/train.sbatch" "${QUICK[@]}" --steps 30 2>"$TMP/log/sbatch.err") ||
    fail "sbatch train.sbatch failed: $(cat "$TMP/log/sbatch.err")"
  echo "slurm: submitted train.sbatch as job $train_job"

  # 2. A sweep over 1 and 2 ranks into one directory.
  sweep_dir="$TMP/results/sweep"
  sweep_job=$(RESULTS_DIR="$sweep_dir" SWEEP_RANKS="1 2" sbatch --parsable --array=0-1 --ntasks=2 \
    --time=00:03:00 --output="$TMP/results/sweep-%A_%a.out" \
    "$REPO/scripts/slurm/sweep.sbatch" "${QUICK[@]}" --steps 20 2>"$TMP/log/sbatch.err") ||
    fail "sbatch sweep.sbatch failed: $(cat "$TMP/log/sbatch.err")"
  echo "slurm: submitted sweep.sbatch as array job $sweep_job"

  wait_for_queue_empty

  check_job "$train_job"
  [[ -f $train_dir/metrics-run0.jsonl ]] ||
    fail "train.sbatch wrote no $train_dir/metrics-run0.jsonl"
  check_summary "$train_dir/metrics-run0.jsonl" 30
  [[ -d $train_dir/checkpoints ]] || fail "train.sbatch made no checkpoint directory"
  grep -q "ranks" "$TMP/results/train-$train_job.out" ||
    fail "train.sbatch's output file lacks its banner"
  echo "slurm: train.sbatch job $train_job completed, 2 ranks, 30 steps, ranks agree"

  for i in 0 1; do check_job "${sweep_job}_$i"; done
  for np in 1 2; do
    [[ -f $sweep_dir/np$np.jsonl ]] || fail "sweep.sbatch wrote no $sweep_dir/np$np.jsonl"
    check_summary "$sweep_dir/np$np.jsonl" 20
  done
  table=$(python3 "$REPO/scripts/slurm/sweep_table.py" "$sweep_dir") ||
    fail "sweep_table.py failed: $table"
  echo "$table"
  [[ $(grep -cE '^ +[12] ' <<<"$table") -eq 2 ]] ||
    fail "sweep table lacks the rows for 1 and 2 ranks"
  echo "slurm: sweep.sbatch array job $sweep_job completed (1 and 2 ranks into one directory)"
}

scenario_preempt() {
  # A longer run (rank 0 delayed 20 ms per step: the fault-injection sleep) gets the batch-shell
  # SIGUSR1 that --signal=B:USR1@120 sends; the script forwards it, the ranks checkpoint and exit
  # 0, the job requeues itself and its second run resumes from the checkpoint to the end.
  local PREEMPT_STEPS=300
  job_deadline=$((SECONDS + JOB_TIMEOUT_S))
  preempt_dir="$TMP/results/preempt"
  preempt_job=$(RESULTS_DIR="$preempt_dir" sbatch --parsable --nodes=1 --ntasks-per-node=2 \
    --time=00:03:00 --output="$TMP/results/preempt-%j.out" \
    "$REPO/scripts/slurm/train.sbatch" "${QUICK[@]}" --steps $PREEMPT_STEPS \
    --inject-delay fixed:0:20 2>"$TMP/log/sbatch.err") ||
    fail "sbatch train.sbatch (preemption run) failed: $(cat "$TMP/log/sbatch.err")"
  echo "slurm: submitted train.sbatch as job $preempt_job for the preemption check"
  # Bounded poll until the first run has trained a few steps (metrics are flushed per record).
  until [[ $(grep -c '"event":"step"' "$preempt_dir/metrics-run0.jsonl" 2>/dev/null) -ge 5 ]]; do
    (( SECONDS < job_deadline )) || fail "preemption run: no 5 steps within ${JOB_TIMEOUT_S}s"
    sleep 0.2
  done
  scancel --batch --signal=USR1 "$preempt_job" || fail "scancel --batch --signal=USR1 failed"
  echo "slurm: sent SIGUSR1 to the batch shell of job $preempt_job"
  # The batch script requeues the job itself; slurmctld starts the second run on its own once
  # the requeue's hold (cred_expire + 1 s, see slurm.conf) has passed. The test must not release
  # the job early (scontrol update StartTime=now): a start within the second of the requeue gets
  # a credential that slurmd treats as revoked, and the job fails without ever running again.
  wait_for_queue_empty

  check_job "$preempt_job"
  restarts=$(scontrol -o show job "$preempt_job" 2>/dev/null | grep -o 'Restarts=[0-9]*')
  [[ $restarts == Restarts=1 ]] ||
    fail "job $preempt_job shows '$restarts', expected Restarts=1 (one requeue)"
  [[ -f $preempt_dir/metrics-run1.jsonl ]] || fail "the requeued run wrote no metrics-run1.jsonl"
  check_summary "$preempt_dir/metrics-run1.jsonl" $PREEMPT_STEPS
  python3 - "$preempt_dir" "$PREEMPT_STEPS" <<'PY' || fail "preemption: no stop and resume"
import json, sys
d, total = sys.argv[1], int(sys.argv[2])
first = [json.loads(l) for l in open(f"{d}/metrics-run0.jsonl") if l.strip()]
second = [json.loads(l) for l in open(f"{d}/metrics-run1.jsonl") if l.strip()]
stopped = [r["step"] for r in first if r.get("event") == "step"]
resumed = [r["step"] for r in second if r.get("event") == "step"]
problems = []
if not stopped or stopped[-1] >= total - 1:
    problems.append(f"run 0 was not stopped early (last step {stopped[-1] if stopped else None})")
if not resumed or resumed[0] == 0:
    problems.append(f"run 1 did not resume (first step {resumed[0] if resumed else None})")
elif stopped and resumed[0] > stopped[-1] + 1:
    problems.append(f"run 1 starts at step {resumed[0]}, after run 0's last step {stopped[-1]}")
for p in problems: print(f"preemption: {p}", file=sys.stderr)
print(f"slurm: preempted after step {stopped[-1] if stopped else None}, "
      f"resumed at step {resumed[0] if resumed else None}")
sys.exit(1 if problems else 0)
PY
  grep -q "requeueing" "$TMP/results/preempt-$preempt_job.out" ||
    fail "train.sbatch did not report the requeue"
  echo "slurm: train.sbatch job $preempt_job checkpointed on SIGUSR1, requeued itself and resumed"
}

scenario_death() {
  # Rank 1 of the srun step (rank 0 delayed 20 ms per step, so the run lasts) is SIGKILLed once
  # training is under way. srun ends the step; rank 0 saved the state first; `resync launch`
  # (train.sbatch) starts a second srun step in the same allocation with --resume.
  local DEATH_STEPS=300
  job_deadline=$((SECONDS + JOB_TIMEOUT_S))
  death_dir="$TMP/results/death"
  death_job=$(RESULTS_DIR="$death_dir" sbatch --parsable --nodes=1 --ntasks-per-node=2 \
    --time=00:03:00 --output="$TMP/results/death-%j.out" \
    "$REPO/scripts/slurm/train.sbatch" "${QUICK[@]}" --steps $DEATH_STEPS \
    --inject-delay fixed:0:20 2>"$TMP/log/sbatch.err") ||
    fail "sbatch train.sbatch (death run) failed: $(cat "$TMP/log/sbatch.err")"
  echo "slurm: submitted train.sbatch as job $death_job for the death check"
  local metrics="$death_dir/metrics-run0.jsonl"
  until [[ $(grep -c '"event":"step"' "$metrics" 2>/dev/null) -ge 20 ]]; do
    (( SECONDS < job_deadline )) || fail "death run: no 20 steps within ${JOB_TIMEOUT_S}s"
    sleep 0.2
  done
  local victim=""
  for pid in $(pgrep -f "metrics-run0.jsonl"); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_PROCID=1" &&
       tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q " train "; then
      victim=$pid
    fi
  done
  [[ -n $victim ]] || fail "death run: could not find rank 1's process"
  kill -KILL "$victim"
  echo "slurm: killed rank 1 (pid $victim) of job $death_job"
  wait_for_queue_empty

  check_job "$death_job"
  check_summary "$metrics" $DEATH_STEPS
  python3 - "$metrics" <<'PY' || fail "death: the relaunched step did not resume"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
s = rows[-1]
if s.get("resumed_from_step") in (None, 0):
    print(f"death: the last run did not resume from a checkpoint: {s}", file=sys.stderr)
    sys.exit(1)
print(f"slurm: the new srun step resumed from step {s['resumed_from_step']}")
PY
  grep -q "relaunching with --resume" "$TMP/results/death-$death_job.out" ||
    fail "resync launch did not report the relaunch"
  echo "slurm: train.sbatch job $death_job lost rank 1 and finished in a new srun step"
}

"scenario_$SCENARIO"
echo "slurm: $SCENARIO: all checks passed"
