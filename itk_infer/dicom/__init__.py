"""DICOM input and output: image series in (:mod:`.series`), DICOM-SEG out (:mod:`.seg`).

pydicom and highdicom are the optional extra ``dicom``; they are imported only when a DICOM
file is actually met, so runs over NIfTI/MetaImage folders never load them.
"""
