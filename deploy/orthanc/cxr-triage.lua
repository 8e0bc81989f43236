-- Orthanc auto-routing to the cxr-triage listener: every CR or DX (for presentation) image that a modality
-- sends to Orthanc over DICOM is sent on, as a C-STORE job, to the modality named TARGET in orthanc.json's
-- "DicomModalities".
--
-- Not routed:
-- - instances that reach Orthanc through the REST API or a plugin (archive imports, migrations): a bulk import
--   of old studies should not flood the triage queue; push those explicitly when wanted, with
--   POST /modalities/cxr-triage/store;
-- - the Structured Reports cxr-triage sends back (Modality SR: no routing loop), other modalities;
-- - DX "for processing" raw detector data (cxr-triage would only record it as refused).
-- Body part and view are left to cxr-triage, which records a reason for every image it does not classify.
--
-- Orthanc runs SendToModality as an asynchronous job: a failure (listener down) shows in GET /jobs and the job
-- can be resubmitted with POST /jobs/{id}/resubmit; cxr-triage ignores an instance it already holds.

local TARGET = 'cxr-triage'
local ROUTED_MODALITIES = { CR = true, DX = true }
local DX_FOR_PROCESSING = '1.2.840.10008.5.1.4.1.1.1.1.1'

function ShouldRouteToCxrTriage(tags, origin)
  if origin == nil or origin['RequestOrigin'] ~= 'DicomProtocol' then
    return false
  end
  if not ROUTED_MODALITIES[tags['Modality'] or ''] then
    return false
  end
  if tags['SOPClassUID'] == DX_FOR_PROCESSING then
    return false
  end
  if string.upper(tags['PresentationIntentType'] or '') == 'FOR PROCESSING' then
    return false
  end
  return true
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if ShouldRouteToCxrTriage(tags, origin) then
    -- UIDs only in logs, never patient names or IDs.
    print('cxr-triage: routing SOP instance ' .. (tags['SOPInstanceUID'] or instanceId))
    SendToModality(instanceId, TARGET)
  end
end
