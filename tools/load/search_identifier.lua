-- GET /Patient?identifier=urn:bench|N for a random N (see README.md).
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/Patient?identifier=urn:bench%7C" .. math.random(1, 2000000000))
end
