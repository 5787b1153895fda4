-- GET /Patient?gender=female|male for a random choice (about half of the Patients each; see README.md).
math.randomseed(os.time())
request = function()
  if math.random(2) == 1 then return wrk.format("GET", "/Patient?gender=female") end
  return wrk.format("GET", "/Patient?gender=male")
end
