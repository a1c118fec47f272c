#!/usr/bin/env bash
# Submit an imprint job spec to a running Ray cluster with `ray job submit`,
# under a submission id derived from the job itself, so that submitting the
# same job twice never runs it twice. See deploy/README.md.
set -euo pipefail

readonly PROG=${0##*/}
readonly DEFAULT_ADDRESS=http://127.0.0.1:8265
# Passed on to the job when set here: they say whether the hub may be reached
# and mean the same on any machine. Cache locations (HF_HOME, TORCH_HOME) are
# machine-specific, so they go only on request (--env HF_HOME).
readonly DEFAULT_PASS_ENV=(HF_HUB_OFFLINE TRANSFORMERS_OFFLINE)
# More attempts than this for one job means something other than bad luck.
readonly MAX_ATTEMPTS=100

usage() {
  cat <<EOF
Usage: $PROG [options] JOB.toml [--set KEY=VALUE ...]

Runs \`imprint run JOB.toml --executor ray --ray-address auto [--set KEY=VALUE ...]\`
as a Ray job on the cluster at ADDR, under a stable submission id.

Options:
  --address ADDR       Ray dashboard address (default: \$RAY_ADDRESS, else $DEFAULT_ADDRESS)
  --set KEY=VALUE      job spec override for imprint run, repeatable
                       (e.g. --set output.path=s3://bucket/runs/run-1)
  --working-dir DIR    upload DIR (e.g. the repository root) as the job's working_dir;
                       JOB.toml must lie inside DIR. Default: upload JOB.toml alone
                       (the cluster's image provides imprint itself).
  --env NAME[=VALUE]   set NAME for the job, to VALUE or else to its value here; repeatable.
                       HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are passed on when set here.
  --no-wait            return once submitted instead of following the job's logs
  --print-id           print the submission id and exit (contacts no cluster)
  --dry-run            print the ray command that would be run and exit (contacts no cluster)
  -h, --help           show this help and exit

Submission id: imprint-<16 hex digits> of the SHA-256 of JOB.toml's bytes and the
--set overrides in their order (so output.path is part of it wherever it is set).
If the cluster already has a job with that id that is PENDING, RUNNING or SUCCEEDED,
its status is printed and nothing is submitted (without --no-wait, the logs of a
running job are followed). If it FAILED or was STOPPED, the job is submitted again
as <id>-r1, <id>-r2, ...; imprint skips the shards that earlier attempts finished.

Paths: the job runs in Ray's copy of its files, so output.path must be absolute or
a URL, and relative input paths (input.shards, input.codes, manipulate.strokes_*)
must lie inside --working-dir; the spec (with the --set overrides) is checked
before anything is submitted.

Exit status: 0 when the job succeeded, or with --no-wait when it is submitted,
pending or running; 1 when it failed or was stopped, or on errors; 2 on usage errors.
EOF
}

die() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  exit "${2:-1}"
}

usage_error() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  printf "Try '%s --help'.\n" "$PROG" >&2
  exit 2
}

sha256() {
  if command -v sha256sum > /dev/null; then
    sha256sum | cut -d' ' -f1
  else
    shasum -a 256 | cut -d' ' -f1
  fi
}

# JSON string literal for $1 (paths and environment values: no control characters).
json_string() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# The submission id: a hash of the job file's content and the overrides, one
# per line and in order (a later --set of the same key wins, so order matters).
submission_id() {
  local file_hash
  file_hash=$(sha256 < "$job_file")
  {
    printf 'imprint-submission-v1\n%s\n' "$file_hash"
    if ((${#overrides[@]})); then
      printf '%s\n' "${overrides[@]}"
    fi
  } | sha256 | cut -c1-16 | sed 's/^/imprint-/'
}

# Prints the status of job $1 on the cluster (PENDING, RUNNING, SUCCEEDED,
# FAILED or STOPPED), or NONE when the cluster has no job with that id.
# Reads the first status line of `ray job status`; "Status message" lines
# after it may quote the job's own logs.
job_status() {
  local id=$1 out line
  if ! out=$(ray job status --address "$address" "$id" 2>&1); then
    if [[ $out == *"Job $id does not exist"* ]]; then
      echo NONE
      return 0
    fi
    printf '%s\n' "$out" >&2
    die "could not query job $id at $address"
  fi
  while IFS= read -r line; do
    case $line in
      *"Job '$id' succeeded"*) echo SUCCEEDED; return 0 ;;
      *"Job '$id' failed"*) echo FAILED; return 0 ;;
      *"Job '$id' was stopped"*) echo STOPPED; return 0 ;;
      *"Status for job '$id': "*)
        line=${line##*"Status for job '$id': "}
        echo "${line%%[!A-Z_]*}"
        return 0
        ;;
    esac
  done <<< "$out"
  printf '%s\n' "$out" >&2
  die "could not read the status of job $id from the output above"
}

# Follows the logs of job $1 to its end; exits 0 if it succeeded, else 1.
follow() {
  local id=$1 status
  ray job logs --address "$address" --follow "$id"
  status=$(job_status "$id")
  echo "$PROG: job $id: $status"
  [[ $status == SUCCEEDED ]] || exit 1
  exit 0
}

# Every local path of the spec (with the --set overrides applied) must work on
# the cluster, where the job runs in Ray's copy of the working_dir: a relative
# output path would land in that copy (deleted with the session), a relative
# input path exists there only when --working-dir uploads it. Absolute paths
# are taken as they are (a filesystem the nodes mount). Python reads the TOML.
check_paths() {
  local rc=0
  command -v python3 > /dev/null || {
    printf '%s: warning: python3 not found; the spec'"'"'s paths are not checked\n' "$PROG" >&2
    return 0
  }
  python3 - "$job_file" "$working_dir" ${overrides[@]+"${overrides[@]}"} <<'PY' || rc=$?
import os
import sys

try:
    import tomllib
except ImportError:
    try:
        import tomli as tomllib
    except ImportError:
        sys.exit(3)
job, working_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(job, "rb") as fh:
        spec = tomllib.load(fh)
except (OSError, tomllib.TOMLDecodeError) as exc:
    print(f"{job}: invalid TOML: {exc}", file=sys.stderr)
    sys.exit(2)
for item in overrides:  # imprint's rule: a TOML value, else a bare string
    key, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node, parts = spec, key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            break
    else:
        node[parts[-1]] = value


def section(name):
    value = spec.get(name)
    return value if isinstance(value, dict) else {}


inp, manipulate = section("input"), section("manipulate")
shards = inp.get("shards", [])
paths = [("output.path", section("output").get("path", "out/job"))]
paths += [("input.shards", s) for s in ([shards] if isinstance(shards, str) else shards)]
paths += [(f, sec.get(f.split(".")[1], "")) for f, sec in
          (("input.codes", inp), ("manipulate.strokes_mask", manipulate), ("manipulate.strokes_image", manipulate))]
problems = []
for field, path in paths:
    if not isinstance(path, str) or not path or path.startswith(("/", "pipe:")) or "://" in path \
            or path in ("demo", "toy-demo"):
        continue
    if field == "output.path":
        problems.append(f"output.path must be absolute or a URL (s3://...) for a cluster job, got '{path}' "
                        "(a relative path lands in Ray's temporary copy of the job's files)")
    elif not working_dir:
        problems.append(f"{field} '{path}' is relative: the job runs next to a copy of the job file alone; give an "
                        "absolute path the cluster's nodes can read, a URL (s3://...), or upload it with --working-dir")
    else:
        cut = min([path.index(c) for c in "*?[{" if c in path] + [len(path)])
        fixed = path if cut == len(path) else os.path.dirname(path[:cut])
        if not os.path.exists(os.path.join(working_dir, fixed or ".")):
            problems.append(f"{field} '{path}' is relative to --working-dir {working_dir}, where "
                            f"{os.path.join(working_dir, fixed)} does not exist")
for line in problems:
    print(line, file=sys.stderr)
sys.exit(2 if problems else 0)
PY
  case $rc in
    0) ;;
    3) printf '%s: warning: python3 has neither tomllib nor tomli; the spec'"'"'s paths are not checked\n' "$PROG" >&2 ;;
    *) printf "%s: the spec's paths above would not work on the cluster (see deploy/README.md)\n" "$PROG" >&2; exit 2 ;;
  esac
}

address=${RAY_ADDRESS:-$DEFAULT_ADDRESS}
job_file=
working_dir=
wait=1
mode=submit
overrides=()
env_names=()
env_values=()

add_env() {
  local name=${1%%=*} value
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage_error "--env expects NAME or NAME=VALUE, got '$1'"
  if [[ $1 == *=* ]]; then
    value=${1#*=}
  elif [[ -n ${!name+set} ]]; then
    value=${!name}
  else
    usage_error "--env $name: $name is not set here (give --env $name=VALUE)"
  fi
  env_names+=("$name")
  env_values+=("$value")
}

need_value() {
  (($2 >= 2)) || usage_error "$1 needs a value"
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --address) need_value "$1" $#; address=$2; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --set) need_value "$1" $#; overrides+=("$2"); shift 2 ;;
    --set=*) overrides+=("${1#*=}"); shift ;;
    --working-dir) need_value "$1" $#; working_dir=$2; shift 2 ;;
    --working-dir=*) working_dir=${1#*=}; shift ;;
    --env) need_value "$1" $#; add_env "$2"; shift 2 ;;
    --env=*) add_env "${1#*=}"; shift ;;
    --no-wait) wait=0; shift ;;
    --print-id) mode=print-id; shift ;;
    --dry-run) mode=dry-run; shift ;;
    --) shift; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *)
      [[ -z $job_file ]] || usage_error "one job file expected, got '$job_file' and '$1'"
      job_file=$1
      shift
      ;;
  esac
done
(($# == 0)) || usage_error "unexpected argument '$1'"
[[ -n $job_file ]] || usage_error "no job file given"
[[ -f $job_file ]] || die "job file not found: $job_file" 2
[[ -r $job_file ]] || die "job file not readable: $job_file" 2
for item in ${overrides[@]+"${overrides[@]}"}; do
  [[ $item =~ ^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+=.*$ ]] \
    || usage_error "--set expects KEY=VALUE with KEY like section.field, got '$item'"
  [[ $item != *$'\n'* ]] || usage_error "--set values must be one line: '$item'"
done
[[ -n $address ]] || usage_error "--address is empty"
if [[ -n $working_dir ]]; then
  [[ -d $working_dir ]] || die "working directory not found: $working_dir" 2
fi
check_paths

id=$(submission_id)
if [[ $mode == print-id ]]; then
  echo "$id"
  exit 0
fi

for name in "${DEFAULT_PASS_ENV[@]}"; do
  if [[ -n ${!name+set} ]] && [[ " ${env_names[*]-} " != *" $name "* ]]; then
    env_names+=("$name")
    env_values+=("${!name}")
  fi
done

# What the cluster runs: the job file inside the uploaded working_dir, named
# relative to it (the entrypoint's current directory is the working_dir).
if [[ -n $working_dir ]]; then
  upload_dir=$(cd "$working_dir" && pwd -P)
  job_abs=$(cd "$(dirname "$job_file")" && pwd -P)/$(basename "$job_file")
  [[ $job_abs == "$upload_dir"/* ]] || die "job file $job_file is not inside --working-dir $working_dir" 2
  job_arg=${job_abs#"$upload_dir"/}
else
  upload_dir=$(mktemp -d "${TMPDIR:-/tmp}/imprint-submit.XXXXXX")
  trap 'rm -rf "$upload_dir"' EXIT
  job_arg=$(basename "$job_file")
  cp "$job_file" "$upload_dir/$job_arg"
fi

runtime_env="{\"working_dir\": $(json_string "$upload_dir")"
if [[ -n $working_dir ]]; then
  # Ray skips .gitignore'd paths too; these are large even where not ignored.
  runtime_env+=', "excludes": [".git", ".venv", ".cache"]'
fi
if ((${#env_names[@]})); then
  runtime_env+=', "env_vars": {'
  for i in "${!env_names[@]}"; do
    ((i == 0)) || runtime_env+=', '
    runtime_env+="$(json_string "${env_names[$i]}"): $(json_string "${env_values[$i]}")"
  done
  runtime_env+='}'
fi
runtime_env+='}'
metadata="{\"imprint_job_file\": $(json_string "$(basename "$job_file")"), \"imprint_submission\": $(json_string "$id")}"

entrypoint=(imprint run "$job_arg" --executor ray --ray-address auto)
for item in ${overrides[@]+"${overrides[@]}"}; do
  entrypoint+=(--set "$item")
done

# The `ray job submit` command line for attempt id $1, into the array cmd.
build_submit_cmd() {
  cmd=(ray job submit --address "$address" --submission-id "$1"
    --runtime-env-json "$runtime_env" --metadata-json "$metadata")
  ((wait)) || cmd+=(--no-wait)
  cmd+=(-- "${entrypoint[@]}")
}

if [[ $mode == dry-run ]]; then
  build_submit_cmd "$id"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

command -v ray > /dev/null || die "the ray CLI is not on PATH (pip install 'ray[default]')"

# The latest attempt of this job on the cluster: the base id, then -r1, -r2, ...
attempt=0
attempt_id=$id
status=$(job_status "$id")
last_id=
last_status=NONE
while [[ $status != NONE ]]; do
  last_id=$attempt_id
  last_status=$status
  ((attempt < MAX_ATTEMPTS)) || die "job $id has $MAX_ATTEMPTS attempts; not submitting more"
  attempt=$((attempt + 1))
  attempt_id=$id-r$attempt
  status=$(job_status "$attempt_id")
done

case $last_status in
  NONE) ;;
  PENDING | RUNNING)
    echo "$PROG: job $last_id is already $last_status at $address; not submitting it again"
    ((wait)) || exit 0
    follow "$last_id"
    ;;
  SUCCEEDED)
    echo "$PROG: job $last_id already SUCCEEDED at $address; not submitting it again"
    exit 0
    ;;
  FAILED | STOPPED)
    echo "$PROG: job $last_id $last_status; submitting $attempt_id, which skips the shards already finished"
    ;;
  *) die "job $last_id has unexpected status '$last_status'" ;;
esac

build_submit_cmd "$attempt_id"
if ((wait)); then
  # ray job submit follows the logs but exits 0 for a stopped job: report the
  # final status ourselves.
  "${cmd[@]}" || true
  status=$(job_status "$attempt_id")
  [[ $status != NONE ]] || die "submitting job $attempt_id to $address failed"
  echo "$PROG: job $attempt_id: $status"
  [[ $status == SUCCEEDED ]] || exit 1
else
  "${cmd[@]}"
fi
