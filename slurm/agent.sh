#!/usr/bin/env bash
# Runs torchrun's agent immune to Slurm's warning signal. `#SBATCH --signal=USR1@T` sends
# USR1 to every process of the job step; USR1's default action is "exit", so the agent
# would die and take its rendezvous store with it. Ignored here, the agent stays up; its
# workers inherit the 'ignore', but each stage installs its own handler (preempt.py),
# saves a checkpoint and exits 0, and then the agent exits 0 too.
trap '' USR1 USR2
exec "$@"
