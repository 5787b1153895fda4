-- POST a Patient with random, searchable values (see README.md).
math.randomseed(os.time())
request = function()
  local n = math.random(1, 2000000000)
  local body = string.format(
    '{"resourceType":"Patient","identifier":[{"system":"urn:bench","value":"%d"}],' ..
    '"name":[{"family":"Fam%d","given":["Given%d"]}],"gender":"%s","birthDate":"19%02d-0%d-1%d"}',
    n, n % 1000, n % 97, (n % 2 == 0) and "male" or "female", n % 100, 1 + n % 9, n % 10)
  return wrk.format("POST", "/Patient", { ["Content-Type"] = "application/fhir+json" }, body)
end
