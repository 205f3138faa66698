"""Reference data generators: run quantum-chemistry-level MD and store frames.

:mod:`stable_md.refdata.xtb_md` makes extended-XYZ data sets (energies in eV,
forces in eV/Å) from Langevin MD with GFN2-xTB via tblite; :mod:`stable_md.refdata.water_md`
from SPC/Fw water in OpenMM.
"""
