#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --array=0-83%8
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=8
#SBATCH --error=FOLDER/%A_%a_0_log.err
#SBATCH --gpus-per-node=2
#SBATCH --job-name=hpt-width
#SBATCH --mail-type=END
#SBATCH --mem=16384MB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=FOLDER/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=90
#SBATCH --wckey=submitit

# setup
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output FOLDER/%A_%a_%t_log.out --error FOLDER/%A_%a_%t_log.err --kill-on-bad-exit=1 PYTHON -u -m submitit.core._submit FOLDER
