-- Orthanc auto-routing to the cxr-triage listener: every stored CR or DX (for presentation) image is sent,
-- as a C-STORE job, to the modality named TARGET in orthanc.json's "DicomModalities".
--
-- Nothing else is sent: not the Structured Reports cxr-triage sends back (Modality SR, so no routing loop),
-- not other modalities, not DX "for processing" raw detector data (cxr-triage would only record it as refused).
-- Body part and view are left to cxr-triage, which records a reason for every image it does not classify.
--
-- Orthanc runs SendToModality as an asynchronous job: a failure (listener down) shows in GET /jobs and the job
-- can be resubmitted with POST /jobs/{id}/resubmit; cxr-triage ignores an instance it already holds.

local TARGET = 'cxr-triage'
local ROUTED_MODALITIES = { CR = true, DX = true }
local DX_FOR_PROCESSING = '1.2.840.10008.5.1.4.1.1.1.1.1'

function ShouldRouteToCxrTriage(tags)
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
  if ShouldRouteToCxrTriage(tags) then
    -- UIDs only in logs, never patient names or IDs.
    print('cxr-triage: routing SOP instance ' .. (tags['SOPInstanceUID'] or instanceId))
    SendToModality(instanceId, TARGET)
  end
end
