#!/usr/bin/env bash
# A real one-node SLURM cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd, fake GPUs) under one folder.
#
#   bash slurm/local-cluster.sh start DIR   # installs Debian's packages if missing, starts, waits for "idle"
#   source DIR/env.sh                       # exports SLURM_CONF: sinfo, sbatch, sacct, bench run --launcher slurm
#   bash slurm/local-cluster.sh stop DIR    # cancels its jobs, stops only the daemons it started (by PID)
#   bash slurm/local-cluster.sh purge DIR   # stop, then delete DIR
#
# For tests and CI on Debian/Ubuntu as root, without systemd; everything lives under DIR (nothing in /etc).
# Knobs (environment): SLURM_LOCAL_ACCOUNTING=1|0 (slurmdbd + MariaDB, which sacct and so submitit need),
# SLURM_LOCAL_GPUS=2 (fake GPUs, symlinks to /dev/null), SLURM_LOCAL_CPUS (may exceed the real count),
# SLURM_LOCAL_MEM_MB, SLURM_LOCAL_PORT_BASE=6817 (slurmctld, slurmd, slurmdbd, MariaDB use base..base+3),
# SLURM_LOCAL_PARTITION=debug, SLURM_LOCAL_CLUSTER=local, SLURM_LOCAL_REQUEUE_DELAY_S=5 (how long a requeued
# job waits before it may start again: Slurm's cred_expire, 120 s by default).
# shared/research/slurm.md explains each setting and the pitfalls it avoids.
# The functions can also be sourced: slurm_local_start DIR, slurm_local_stop DIR, slurm_local_purge DIR.

_sl_log() { printf 'local-cluster: %s\n' "$*" >&2; }
_sl_die() {
	_sl_log "error: $*"
	return 1
}

_sl_settings() {
	SL_ACCT=${SLURM_LOCAL_ACCOUNTING:-1}
	SL_GPUS=${SLURM_LOCAL_GPUS:-2}
	SL_PORT=${SLURM_LOCAL_PORT_BASE:-6817}
	SL_PART=${SLURM_LOCAL_PARTITION:-debug}
	SL_NAME=${SLURM_LOCAL_CLUSTER:-local}
	SL_REQUEUE_DELAY=${SLURM_LOCAL_REQUEUE_DELAY_S:-5}
}

# Packages -------------------------------------------------------------------------------------------------

_sl_missing_packages() {
	local p pkgs=(munge slurmctld slurmd slurm-client)
	[[ $SL_ACCT == 1 ]] && pkgs+=(slurmdbd mariadb-server mariadb-client)
	for p in "${pkgs[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || printf '%s ' "$p"
	done
}

_sl_install() {
	local missing
	missing=$(_sl_missing_packages)
	[[ -z $missing ]] && return 0
	[[ $(id -u) == 0 ]] || { _sl_die "missing packages: $missing; install them (apt-get) or run as root"; return 1; }
	command -v apt-get >/dev/null || { _sl_die "missing packages: $missing, and no apt-get here"; return 1; }
	_sl_log "installing $missing"
	# Package scripts try to start the services system-wide: a temporary policy-rc.d denies that.
	local policy=/usr/sbin/policy-rc.d ours=0 rc=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
	fi
	# shellcheck disable=SC2086  # word splitting of the package list is intended
	local apt=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 $missing)
	DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null ||
		{ apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; } ||
		rc=1
	[[ $ours == 1 ]] && rm -f "$policy"
	[[ $rc == 0 ]] || _sl_die "apt-get install $missing failed"
}

# Processes ------------------------------------------------------------------------------------------------

# A live (not zombie) process whose name is $2 and that belongs to this cluster's folder $3.
_sl_ours() {
	local pid=$1 comm=$2 dir=$3
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[[ -r /proc/$pid/status ]] || return 1
	grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && return 1
	[[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
	# (the process may end while we look: the braces silence the shell's own "No such process")
	{ tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$dir/" && return 0
	{ tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$dir/etc/slurm.conf"
}

_sl_pid() { [[ -r $1 ]] && tr -dc '0-9' <"$1"; }

_sl_running() { _sl_ours "$(_sl_pid "$1")" "$2" "$3"; }

_sl_kill() { # pidfile comm dir
	local pid i
	pid=$(_sl_pid "$1")
	_sl_ours "$pid" "$2" "$3" || { rm -f "$1"; return 0; }
	kill -TERM "$pid" 2>/dev/null
	for i in $(seq 100); do
		_sl_ours "$pid" "$2" "$3" || break
		sleep 0.1
	done
	_sl_ours "$pid" "$2" "$3" && kill -KILL "$pid" 2>/dev/null
	rm -f "$1"
}

_sl_wait() { # seconds what command...
	local t=$1 what=$2 i
	shift 2
	for i in $(seq $((t * 5))); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	_sl_die "$what not ready after ${t}s (logs in $SL_DIR/log)"
}

# Configuration --------------------------------------------------------------------------------------------

_sl_write_config() {
	local d=$SL_DIR real_cpus real_mem cpus mem overrides="" gres="" i
	real_cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
	real_mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
	cpus=${SLURM_LOCAL_CPUS:-$real_cpus}
	mem=${SLURM_LOCAL_MEM_MB:-$((real_mem - 512))}
	# More CPUs or memory than the hardware makes the node "inval" unless slurmd may override its checks.
	if ((cpus > real_cpus || mem > real_mem)); then overrides="SlurmdParameters=config_overrides"; fi
	mkdir -p "$d/dev"
	if ((SL_GPUS > 0)); then
		# Character devices are required for CUDA_VISIBLE_DEVICES to be set; /dev/null stands in for a GPU.
		for ((i = 0; i < SL_GPUS; i++)); do ln -sfn /dev/null "$d/dev/gpu$i"; done
		gres="Gres=gpu:fake:$SL_GPUS"
		printf 'AutoDetect=off\nNodeName=localhost Name=gpu Type=fake File=%s/dev/gpu[0-%d]\n' \
			"$d" $((SL_GPUS - 1)) >"$d/etc/gres.conf"
	else
		: >"$d/etc/gres.conf"
	fi
	cat >"$d/etc/slurm.conf" <<EOF
# Written by slurm/local-cluster.sh: a one-node test cluster under $d.
ClusterName=$SL_NAME
SlurmctldHost=localhost
SlurmctldPort=$SL_PORT
SlurmdPort=$((SL_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$d/munge/munge.socket,cred_expire=$SL_REQUEUE_DELAY
CredType=cred/munge
StateSaveLocation=$d/ctld
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=5
MinJobAge=300
JobCompType=jobcomp/none
JobRequeue=1
SchedulerParameters=sched_interval=2,bf_interval=2
GresTypes=gpu
$overrides
EOF
	if [[ $SL_ACCT == 1 ]]; then
		cat >>"$d/etc/slurm.conf" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((SL_PORT + 2))
AccountingStoragePass=$d/munge/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
	fi
	cat >>"$d/etc/slurm.conf" <<EOF
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN
PartitionName=$SL_PART Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

_sl_write_dbd_config() {
	local d=$SL_DIR
	(
		umask 077
		cat >"$d/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$d/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((SL_PORT + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((SL_PORT + 3))
StorageUser=slurm
StoragePass=$(cat "$d/mysql/password")
StorageLoc=slurm_acct_db
LogFile=$d/log/slurmdbd.log
PidFile=$d/run/slurmdbd.pid
EOF
	)
}

# Daemons --------------------------------------------------------------------------------------------------

_sl_start_munge() {
	local d=$SL_DIR
	_sl_running "$d/munge/munged.pid" munged "$d" && return 0
	# munged refuses keys readable by others and sockets in folders not executable by all.
	chmod 0755 "$d/munge"
	[[ -s $d/munge/munge.key ]] || mungekey -c -k "$d/munge/munge.key" || return 1
	chmod 0600 "$d/munge/munge.key"
	munged --key-file="$d/munge/munge.key" --socket="$d/munge/munge.socket" --pid-file="$d/munge/munged.pid" \
		--seed-file="$d/munge/munged.seed" --log-file="$d/log/munged.log" || { _sl_die "munged did not start"; return 1; }
	_sl_wait 20 munged bash -c "munge -n -S '$d/munge/munge.socket' | unmunge -S '$d/munge/munge.socket'"
}

_sl_sql() { mariadb --no-defaults -S "$SL_DIR/mysql/mysql.sock" -u root -e "$1"; }

_sl_start_mariadb() {
	local d=$SL_DIR port=$((SL_PORT + 3))
	_sl_running "$d/run/mariadb.pid" mariadbd "$d" && return 0
	if [[ ! -d $d/mysql/data/mysql ]]; then
		mkdir -p "$d/mysql/data"
		mariadb-install-db --no-defaults --datadir="$d/mysql/data" --user=root >"$d/log/mariadb-install.log" 2>&1 ||
			{ _sl_die "mariadb-install-db failed (see $d/log/mariadb-install.log)"; return 1; }
	fi
	# setsid -f: no shell stays behind as the server's parent.
	setsid -f mariadbd --no-defaults --user=root --datadir="$d/mysql/data" --port="$port" --bind-address=127.0.0.1 \
		--socket="$d/mysql/mysql.sock" --pid-file="$d/run/mariadb.pid" --log-error="$d/log/mariadb.log" \
		--skip-log-bin </dev/null >/dev/null 2>&1
	_sl_wait 60 MariaDB mariadb-admin --no-defaults -S "$d/mysql/mysql.sock" -u root ping || return 1
	if [[ ! -s $d/mysql/password ]]; then
		(umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$d/mysql/password")
		local pw
		pw=$(cat "$d/mysql/password")
		_sl_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
		         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" ||
			{ _sl_die "could not create the slurm database user"; return 1; }
	fi
}

_sl_start_slurmdbd() {
	local d=$SL_DIR
	_sl_running "$d/run/slurmdbd.pid" slurmdbd "$d" && return 0
	_sl_write_dbd_config
	SLURM_CONF=$d/etc/slurm.conf slurmdbd || { _sl_die "slurmdbd did not start (see $d/log/slurmdbd.log)"; return 1; }
	_sl_wait 60 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$((SL_PORT + 2))"
}

_sl_node_state() { SLURM_CONF=$SL_DIR/etc/slurm.conf sinfo -h -n localhost -o %T 2>/dev/null; }

_sl_start_slurm() {
	local d=$SL_DIR i state resumed=0
	export SLURM_CONF=$d/etc/slurm.conf
	if ! _sl_running "$d/run/slurmctld.pid" slurmctld "$d"; then
		slurmctld || { _sl_die "slurmctld did not start (see $d/log/slurmctld.log)"; return 1; }
	fi
	_sl_wait 30 slurmctld scontrol ping || return 1
	if ! _sl_running "$d/run/slurmd.pid" slurmd "$d"; then
		slurmd -N localhost || { _sl_die "slurmd did not start (see $d/log/slurmd.log)"; return 1; }
	fi
	for i in $(seq 300); do
		state=$(_sl_node_state)
		[[ $state == idle || $state == mixed || $state == allocated ]] && break
		# A node once marked drained/invalid stays so until resumed, even after the cause is fixed.
		if [[ $resumed == 0 && $state =~ drain|inval|down ]]; then
			scontrol update nodename=localhost state=resume >/dev/null 2>&1 && resumed=1
		fi
		sleep 0.2
	done
	[[ $state == idle || $state == mixed || $state == allocated ]] ||
		{ _sl_die "node is '$state', not idle (see $d/log/slurmd.log and slurmctld.log)"; return 1; }
	if [[ $SL_ACCT == 1 ]]; then
		_sl_wait 60 "accounting (sacctmgr)" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx '$SL_NAME'"
	fi
}

# Commands -------------------------------------------------------------------------------------------------

slurm_local_start() {
	[[ -n ${1:-} ]] || { _sl_die "usage: start DIR"; return 1; }
	_sl_settings
	mkdir -p "$1" && SL_DIR=$(cd "$1" && pwd -P) || return 1
	local d=$SL_DIR t0=$SECONDS
	if [[ -e $d/etc/slurm.conf && ! -e $d/.local-cluster ]]; then
		_sl_die "$d holds a slurm.conf that this script did not write; pick another folder"
		return 1
	fi
	_sl_install || return 1
	mkdir -p "$d"/{etc,munge,log,run,ctld,spool,mysql} && chmod 0755 "$d" "$d/munge" "$d/log" && touch "$d/.local-cluster"
	_sl_write_config
	_sl_start_munge || return 1
	if [[ $SL_ACCT == 1 ]]; then
		_sl_start_mariadb && _sl_start_slurmdbd || return 1
	fi
	_sl_start_slurm || return 1
	cat >"$d/env.sh" <<EOF
# Source this file to talk to the local test cluster in $d.
export SLURM_CONF=$d/etc/slurm.conf
export SLURM_LOCAL_DIR=$d
EOF
	_sl_log "cluster '$SL_NAME' up in $((SECONDS - t0))s: source $d/env.sh"
}

slurm_local_stop() {
	[[ -n ${1:-} ]] || { _sl_die "usage: stop DIR"; return 1; }
	[[ -d $1 ]] || return 0
	_sl_settings
	SL_DIR=$(cd "$1" && pwd -P) || return 1
	local d=$SL_DIR pid
	if _sl_running "$d/run/slurmctld.pid" slurmctld "$d"; then
		local jobs
		jobs=$(SLURM_CONF=$d/etc/slurm.conf squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
		if [[ -n ${jobs// /} ]]; then
			# shellcheck disable=SC2086
			SLURM_CONF=$d/etc/slurm.conf scancel $jobs 2>/dev/null
			_sl_wait 20 "job cancellation" bash -c "[[ -z \$(SLURM_CONF='$d/etc/slurm.conf' squeue -h -t R,CG -o %A) ]]" || true
		fi
	fi
	_sl_kill "$d/run/slurmd.pid" slurmd "$d"
	# Job steps outlive slurmd; only those started by this cluster's slurmd carry its SLURM_CONF.
	for pid in $(pgrep -x slurmstepd 2>/dev/null); do
		_sl_ours "$pid" slurmstepd "$d" && kill -KILL "$pid" 2>/dev/null
	done
	_sl_kill "$d/run/slurmctld.pid" slurmctld "$d"
	_sl_kill "$d/run/slurmdbd.pid" slurmdbd "$d"
	_sl_kill "$d/run/mariadb.pid" mariadbd "$d"
	_sl_kill "$d/munge/munged.pid" munged "$d"
	_sl_log "stopped the cluster in $d"
}

slurm_local_purge() {
	[[ -n ${1:-} ]] || { _sl_die "usage: purge DIR"; return 1; }
	[[ -d $1 ]] || return 0
	if [[ -n $(ls -A "$1") && ! -e $1/.local-cluster ]]; then
		_sl_die "$1 was not made by this script; not deleting it"
		return 1
	fi
	slurm_local_stop "$1" && rm -rf "$1"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	set -uo pipefail
	case ${1:-} in
	start | stop | purge) "slurm_local_$1" "${2:-}" ;;
	*)
		echo "usage: $0 start|stop|purge DIR" >&2
		exit 2
		;;
	esac
fi
