"""Reference data for a capped peptide, Ac-(Ala)n-NHMe under Amber14 in OpenMM (``stable-md data amber-peptide``).

The paper's tetrapeptide system is Ac-Ala3-NHMe at 500 K. Its heavy atoms are built here from a SMILES with
every alanine L (RDKit embedding, MMFF clean-up), named as PDB residues ACE, ALA and NME; OpenMM's Modeller
adds the hydrogens and amber14-all labels the frames (:class:`openmm_bridge.peptide.PeptideSimulation`), in
vacuum or OBC2 implicit solvent, every bond flexible, under a Langevin thermostat. Frames go to a resumable
extended XYZ file (:func:`stable_md.refdata.openmm_md.run_labelled_md`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stable_md.refdata.openmm_md import md_settings, run_labelled_md

# PDB names of the heavy atoms in the SMILES' atom order: the acetyl cap, each alanine, the N-methyl cap.
_ACE = ("CH3", "C", "O")
_ALA = ("N", "CA", "CB", "C", "O")
_NME = ("N", "C")


def capped_alanine_smiles(n_alanines: int) -> str:
    """Ac-(Ala)n-NHMe with L-alanines (``N[C@@H](C)C(=O)``), heavy atoms in the order of :data:`_ACE`, n x
    :data:`_ALA`, :data:`_NME`."""
    return "CC(=O)" + "N[C@@H](C)C(=O)" * n_alanines + "NC"


def capped_alanine_heavy_atoms(n_alanines: int = 3, seed: int = 0) -> list[tuple[int, str, str, int, np.ndarray]]:
    """``(residue index, residue name, atom name, atomic number, position Å)`` of the heavy atoms of
    Ac-(Ala)n-NHMe, from an RDKit conformer (ETKDG with ``seed``, MMFF-optimized)."""
    try:
        from rdkit import Chem
        from rdkit.Chem import AllChem
    except ImportError as error:
        raise ImportError(f"building the peptide needs RDKit: pip install 'stable-md[xtb]' ({error})") from error

    if int(n_alanines) != n_alanines or n_alanines < 1:
        raise ValueError(f"the peptide needs at least one alanine, got {n_alanines!r}")
    molecule = Chem.AddHs(Chem.MolFromSmiles(capped_alanine_smiles(int(n_alanines))))
    parameters = AllChem.ETKDGv3()
    parameters.randomSeed = int(seed)
    if AllChem.EmbedMolecule(molecule, parameters) != 0:
        raise ValueError(f"RDKit could not embed Ac-(Ala){n_alanines}-NHMe with seed {seed}; try another --seed")
    AllChem.MMFFOptimizeMolecule(molecule, maxIters=2000)
    coordinates = molecule.GetConformer().GetPositions()
    names = [("ACE", name) for name in _ACE] + [("ALA", name) for _ in range(int(n_alanines)) for name in _ALA] \
        + [("NME", name) for name in _NME]
    heavy = [atom for atom in molecule.GetAtoms() if atom.GetAtomicNum() > 1]
    atoms, residue = [], -1
    for k, (atom, (residue_name, atom_name)) in enumerate(zip(heavy, names)):
        if atom_name == names[0][1] or (residue_name != "ACE" and atom_name == "N"):
            residue += 1
        atoms.append((residue, residue_name, atom_name, atom.GetAtomicNum(), coordinates[atom.GetIdx()]))
    return atoms


def run_peptide_md(output: str | os.PathLike, n_alanines: int = 3, solvent: str = "vacuum",
                   temperature: float = 500.0, timestep_fs: float = 0.5, friction: float = 1.0,
                   n_frames: int = 2000, every: int = 100, equilibration_steps: int = 20_000, seed: int = 0,
                   resume: bool = True, progress: bool = True, platform: str = "CPU",
                   dense_frames: int = 0) -> Path:
    """Simulate Ac-(Ala)n-NHMe under Amber14 and write ``n_frames`` labelled frames to ``output`` (extended XYZ).

    Units: K, fs, 1/ps (friction). With ``resume`` an existing output of the same settings is continued from its
    checkpoint; otherwise an existing file is refused. ``dense_frames`` frames one step apart with velocities
    follow the regular ones (the dense segment: the reference VACF).
    """
    from openmm_bridge.peptide import SOLVENTS, PeptideSimulation

    if solvent not in SOLVENTS:
        raise ValueError(f"unknown solvent {solvent!r} (--solvent); expected one of {list(SOLVENTS)}")
    settings = {**md_settings(temperature, timestep_fs, friction, n_frames, every, equilibration_steps, seed),
                "peptide_alanines": int(n_alanines), "peptide_solvent": solvent, "forcefield": "amber14-all"}
    peptide = PeptideSimulation(capped_alanine_heavy_atoms(n_alanines, seed), solvent, temperature, timestep_fs,
                                friction, seed, platform)
    return run_labelled_md(peptide, Path(output), settings, n_frames, equilibration_steps, resume, progress,
                           f"Ac-(Ala){n_alanines}-NHMe",
                           lambda: f"Ac-(Ala){n_alanines}-NHMe (--alanines {n_alanines})", dense_frames)
