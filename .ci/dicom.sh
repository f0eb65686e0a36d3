#!/usr/bin/env bash
# Debian packages for tests/dicom: dciodvfy (dicom3tools) validates the DICOM-SEGs; Orthanc
# with its DICOMweb plugin is the PACS the tests start on loopback (never as a service).
set -euo pipefail
if command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null \
        && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dicom3tools orthanc orthanc-dicomweb
# The package starts a system-wide Orthanc where an init system runs; the tests start their
# own, so stop that one if it is running (it would only take memory and port 8042).
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
    systemctl stop orthanc || true
fi
