-- Orthanc auto-routing of head CTs to radnet-node.
--
-- When a series has been stable for Orthanc's "StableAge" seconds, send it to the DICOM modality
-- named RADNET_MODALITY (declared in "DicomModalities" of orthanc.json) if it is a CT image series
-- of the head. The decision is written to Orthanc's log. The node makes the final choice of series
-- (it skips localizers and reformats with an audited reason); this filter only keeps other body
-- parts and other modalities off the wire. The node's own results (SR, SEG, Secondary Capture) are
-- never CT image storage, so they are never routed back.

local RADNET_MODALITY = 'radnet'

-- CT Image, Enhanced CT Image and Legacy Converted Enhanced CT Image Storage.
local CT_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.2'] = true,
  ['1.2.840.10008.5.1.4.1.1.2.1'] = true,
  ['1.2.840.10008.5.1.4.1.1.2.2'] = true,
}

-- Words that mark a head examination in BodyPartExamined, descriptions or the protocol name.
local HEAD_WORDS = {
  'HEAD', 'BRAIN', 'SKULL', 'CRANI', 'CEREB', 'NEURO', 'STROKE', 'KOPF', 'SCHAEDEL', 'SCHADEL',
  'CRANE', 'CERVEAU', 'TETE', 'CABEZA', 'CRANEO', 'CRANIO', 'HOOFD', 'HERSEN',
}

local function IsHeadText(text)
  if text == nil or text == '' then
    return false
  end
  local upper = string.upper(text)
  for _, word in ipairs(HEAD_WORDS) do
    if string.find(upper, word, 1, true) ~= nil then
      return true
    end
  end
  return false
end

function IsHeadCtSeries(seriesTags, studyTags, instanceTags)
  if seriesTags['Modality'] ~= 'CT' then
    return false, 'modality is not CT'
  end
  if not CT_SOP_CLASSES[instanceTags['SOPClassUID'] or ''] then
    return false, 'not a CT image SOP class'
  end
  for _, text in ipairs({
    seriesTags['BodyPartExamined'], seriesTags['SeriesDescription'], seriesTags['ProtocolName'],
    studyTags['StudyDescription'], instanceTags['BodyPartExamined'],
  }) do
    if IsHeadText(text) then
      return true, 'head CT'
    end
  end
  return false, 'no head-like body part or description'
end

-- Routing jobs on their way, and series whose job failed (the node was down
-- or refused the association): Orthanc retries nothing by itself, so they are sent again by
-- RetryFailedSeries, at every heart beat (Orthanc >= 1.11 with "LuaHeartBeatPeriod" > 0) and
-- before each newly stable series is routed (any version). The node stores an instance it already
-- has once, so a series sent again is never processed twice.
local sending = {}  -- job ID -> { series = series ID, tries = failed tries before this job }
local failed = {}  -- series ID -> failed tries so far, waiting to be sent again
-- after this many failed tries (an hour of heart beats) a series is left for the admin (/jobs)
local MAX_TRIES = 120

local function Failed(seriesId, tries, why)
  tries = tries + 1
  if tries >= MAX_TRIES then
    print('radnet-autoroute: series ' .. seriesId .. ' NOT sent to ' .. RADNET_MODALITY .. ' ('
      .. why .. '); given up after ' .. tries .. ' failed tries: send it again by hand')
  else
    failed[seriesId] = tries
    print('radnet-autoroute: series ' .. seriesId .. ' NOT sent to ' .. RADNET_MODALITY .. ' ('
      .. why .. '); it is tried again later')
  end
end

local function SendSeries(seriesId, what, tries)
  local ok, answer = pcall(RestApiPost, '/modalities/' .. RADNET_MODALITY .. '/store',
    DumpJson({ Resources = { seriesId }, Asynchronous = true, Priority = 0 }))
  if not ok then
    Failed(seriesId, tries, 'not queued: ' .. tostring(answer))
    return
  end
  local job = ParseJson(answer)
  sending[job['ID']] = { series = seriesId, tries = tries }
  print('radnet-autoroute: series ' .. seriesId .. ' (' .. what .. ') queued for '
    .. RADNET_MODALITY .. ' as job ' .. job['ID'])
end

function RetryFailedSeries()
  local retry = failed
  failed = {}
  for seriesId, tries in pairs(retry) do
    -- a series deleted from Orthanc meanwhile is dropped
    if pcall(RestApiGet, '/series/' .. seriesId) then
      SendSeries(seriesId, 'again, after ' .. tries .. ' failed tries', tries)
    end
  end
end

-- The routing job ``jobId`` has ended: what it was sending (nil for other jobs), now forgotten.
local function Ended(jobId)
  local entry = sending[jobId]
  sending[jobId] = nil
  return entry
end

function OnJobSuccess(jobId)
  local entry = Ended(jobId)
  if entry ~= nil then
    print('radnet-autoroute: series ' .. entry.series .. ' sent to ' .. RADNET_MODALITY
      .. ' (job ' .. jobId .. ')')
  end
end

function OnJobFailure(jobId)
  local entry = Ended(jobId)
  if entry ~= nil then
    local ok, answer = pcall(RestApiGet, '/jobs/' .. jobId)
    local why = ok and ParseJson(answer)['ErrorDescription'] or 'unknown error'
    Failed(entry.series, entry.tries, 'job ' .. jobId .. ': ' .. tostring(why))
  end
end

function OnHeartBeat()
  RetryFailedSeries()
end

function OnStableSeries(seriesId, tags, metadata)
  failed[seriesId] = nil  -- routed afresh below, not twice
  RetryFailedSeries()
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if #instances == 0 then
    return
  end
  local instanceTags = ParseJson(RestApiGet('/instances/' .. instances[1]['ID'] .. '/simplified-tags'))
  local study = ParseJson(RestApiGet('/series/' .. seriesId .. '/study'))
  local route, reason = IsHeadCtSeries(tags, study['MainDicomTags'], instanceTags)
  if not route then
    print('radnet-autoroute: series ' .. seriesId .. ' not sent: ' .. reason)
    return
  end
  -- an asynchronous job: the Lua thread is not blocked while the series is sent
  SendSeries(seriesId, #instances .. ' instances', 0)
end
